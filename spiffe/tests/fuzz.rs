use weft_spiffe::fuzzing::parse_never_panics;
use weft_spiffe::SpiffeId;

const FRAGMENTS: &[&str] = &[
    "spiffe://",
    "td",
    "/",
    ".",
    "..",
    "%",
    "A",
    "ns",
    "sa",
    "?",
    "",
    "é",
    "#",
    ":",
    "@",
    "SPIFFE://",
];

/// Deterministic xorshift so failures reproduce without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Mostly-well-formed IDs: a scheme, a trust domain, then `/`-joined
/// segments, each drawn from the fragments, so that many survive parsing and
/// the accessors' invariants actually get checked.
fn structured(rng: &mut Rng) -> String {
    const TRUST_DOMAINS: &[&str] = &["td", "a.b", "x_y-z", "", "A", "td:1", "é"];
    // Valid segments outnumber bad ones so that a fair share of IDs parse.
    const SEGMENTS: &[&str] = &[
        "ns", "sa", "ns", "sa", "td", "A", "x.y", "a-b_c", "..", ".", "", "%2F", "é", "?", "#",
    ];
    let mut s = String::from("spiffe://");
    s.push_str(TRUST_DOMAINS[rng.below(TRUST_DOMAINS.len())]);
    let mut segments = rng.below(5) + 1;
    // A third of the time use the mesh's /ns/<ns>/sa/<sa> shape, sometimes
    // with extra segments, so workload() is exercised on both sides.
    if rng.below(3) == 0 {
        s.push_str("/ns/");
        s.push_str(SEGMENTS[rng.below(SEGMENTS.len())]);
        s.push_str("/sa/");
        s.push_str(SEGMENTS[rng.below(SEGMENTS.len())]);
        segments = rng.below(2);
    }
    for _ in 0..segments {
        s.push('/');
        s.push_str(SEGMENTS[rng.below(SEGMENTS.len())]);
    }
    s
}

/// Free concatenations of fragments, to hit odd orderings.
fn freeform(rng: &mut Rng) -> String {
    let mut s = String::new();
    for _ in 0..rng.below(10) {
        s.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]);
    }
    s
}

#[test]
fn generated_strings_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut accepted = 0;
    let mut workloads = 0;
    for i in 0..2000 {
        let s = if i % 2 == 0 {
            structured(&mut rng)
        } else {
            freeform(&mut rng)
        };
        parse_never_panics(s.as_bytes());
        if let Ok(id) = SpiffeId::parse(&s) {
            accepted += 1;
            workloads += usize::from(id.workload().is_some());
        }
    }
    // Guards against a generator that only ever produces rejected inputs.
    assert!(accepted > 50, "only {accepted} generated IDs were valid");
    assert!(workloads > 0, "no generated ID had a /ns/<ns>/sa/<sa> path");
}

#[test]
fn all_pairs_and_triples_of_fragments_never_panic() {
    for a in FRAGMENTS {
        for b in FRAGMENTS {
            for c in FRAGMENTS {
                parse_never_panics(format!("{a}{b}{c}").as_bytes());
            }
        }
    }
}

#[test]
fn odd_bytes_never_panic() {
    parse_never_panics(b"");
    parse_never_panics(b"spiffe://td/\xff\xfe");
    parse_never_panics(&[0xc3]);
    parse_never_panics("spiffe://td/".repeat(500).as_bytes());
    parse_never_panics(format!("spiffe://td/{}", "é".repeat(2000)).as_bytes());
    parse_never_panics(b"spiffe://cluster.local/ns/default/sa/web");
}
