//! A small reader of the Prometheus text format, enough to assert on counters and gauges.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    /// The scraped text, for failure messages.
    pub text: String,
}

impl Metrics {
    /// Parses Prometheus text exposition; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(parse_line)
            .collect();
        Metrics {
            samples,
            text: text.to_string(),
        }
    }

    /// Samples named `name` whose labels include every `(label, value)` in `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the first sample matching `name` and `labels`, if any.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels).next().map(|s| s.value)
    }

    /// The sum over samples matching `name` and `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The lines of the scrape that mention `name`, for failure messages.
    pub fn lines_for(&self, name: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.contains(name))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ', '\t']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(body) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(body)?;
        labels = parsed;
        after
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` and returns the labels and the text after `}`.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_escapes() {
        let m = Metrics::parse(
            "# HELP x y\n# TYPE weft_requests_total counter\n\
             weft_requests_total{direction=\"outbound\",route=\"a,\\\"b\\\"\",code=\"200\"} 3\n\
             weft_up 1\n\
             weft_h_bucket{le=\"+Inf\"} 7 1700000000\n",
        );
        assert_eq!(m.get("weft_up", &[]), Some(1.0));
        assert_eq!(
            m.get("weft_requests_total", &[("route", "a,\"b\"")]),
            Some(3.0)
        );
        assert_eq!(m.sum("weft_requests_total", &[("code", "200")]), 3.0);
        assert_eq!(m.sum("weft_requests_total", &[("code", "500")]), 0.0);
        assert_eq!(m.get("weft_h_bucket", &[("le", "+Inf")]), Some(7.0));
    }
}
