//! Finds the source line of a field path (`routes[0].destinations[1].service`) in a policy file.
//!
//! `serde_yaml` reports positions only for parse errors, so semantic errors locate their entry
//! by walking the block structure of the source text (indentation, `key:` and `- ` items). Flow
//! collections (`{a: 1}`, `[a, b]`) are not descended into: the line of the deepest entry that
//! could be found is returned instead, which is the line holding the flow collection.

/// A node's extent in the source: its content starts at (`line`, `col`) and continues on the
/// following lines up to (excluding) `end`.
#[derive(Debug, Clone, Copy)]
struct Region {
    line: usize,
    col: usize,
    end: usize,
}

/// The 1-based line of `path` in `source`, or of its deepest locatable ancestor (1 if none).
pub fn line_of(source: &str, path: &str) -> usize {
    let lines: Vec<&str> = source.lines().collect();
    let Some(first) = (0..lines.len()).find(|&l| is_content(lines[l])) else {
        return 1;
    };
    let mut region = Region {
        line: first,
        col: indent(lines[first]),
        end: lines.len(),
    };
    let mut found = first;
    for segment in segments(path) {
        let next = match segment {
            Segment::Key(key) => find_key(&lines, region, key),
            Segment::Index(i) => find_index(&lines, region, i),
        };
        match next {
            Some((line, value)) => {
                found = line;
                region = value;
            }
            None => break,
        }
    }
    found + 1
}

#[derive(Debug, PartialEq)]
enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let Some(close) = stripped.find(']') else {
                break;
            };
            if let Ok(i) = stripped[..close].parse() {
                out.push(Segment::Index(i));
            }
            rest = &stripped[close + 1..];
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !(t.is_empty() || t.starts_with('#') || t == "---" || t == "...")
}

/// The text of `line` from column `col` (empty if the line is shorter).
fn text_from<'a>(lines: &[&'a str], line: usize, col: usize) -> &'a str {
    lines[line].get(col..).unwrap_or("")
}

/// The (line, column) positions where entries of the node in `region` may start.
fn entry_starts(lines: &[&str], region: Region) -> Vec<(usize, usize)> {
    let mut out = vec![(region.line, region.col)];
    let end = region.end.min(lines.len());
    for (l, text) in lines.iter().enumerate().take(end).skip(region.line + 1) {
        if is_content(text) && indent(text) == region.col {
            out.push((l, region.col));
        }
    }
    out
}

fn is_dash(text: &str) -> bool {
    text == "-" || text.starts_with("- ") || text.starts_with("-\t")
}

fn find_key(lines: &[&str], region: Region, key: &str) -> Option<(usize, Region)> {
    for (line, col) in entry_starts(lines, region) {
        let text = text_from(lines, line, col);
        let rest = [
            format!("{key}:"),
            format!("\"{key}\":"),
            format!("'{key}':"),
        ]
        .iter()
        .find_map(|k| text.strip_prefix(k.as_str()));
        let Some(rest) = rest else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
            continue;
        }
        // The value ends at the next line indented at most as the key; a block sequence may sit
        // at the key's own indentation.
        let mut end = region.end.min(lines.len());
        for l in line + 1..end {
            if !is_content(lines[l]) {
                continue;
            }
            let ind = indent(lines[l]);
            if ind < col || (ind == col && !is_dash(text_from(lines, l, ind))) {
                end = l;
                break;
            }
        }
        let trimmed = rest.trim_start();
        let value = if !trimmed.is_empty() && !trimmed.starts_with('#') {
            let value_col = lines[line].len() - trimmed.len();
            Region {
                line,
                col: value_col,
                end,
            }
        } else {
            match (line + 1..end).find(|&l| is_content(lines[l])) {
                Some(l) => Region {
                    line: l,
                    col: indent(lines[l]),
                    end,
                },
                None => Region {
                    line,
                    col: lines[line].len(),
                    end: line + 1,
                },
            }
        };
        return Some((line, value));
    }
    None
}

fn find_index(lines: &[&str], region: Region, index: usize) -> Option<(usize, Region)> {
    let starts: Vec<(usize, usize)> = entry_starts(lines, region)
        .into_iter()
        .filter(|&(l, c)| is_dash(text_from(lines, l, c)))
        .collect();
    let &(line, col) = starts.get(index)?;
    if starts.first().map(|s| s.0) != Some(region.line) {
        return None;
    }
    let end = starts
        .get(index + 1)
        .map_or(region.end.min(lines.len()), |s| s.0);
    let after_dash = &text_from(lines, line, col)[1..];
    let content = after_dash.trim_start();
    let value = if !content.is_empty() && !content.starts_with('#') {
        Region {
            line,
            col: lines[line].len() - content.len(),
            end,
        }
    } else {
        match (line + 1..end).find(|&l| is_content(lines[l])) {
            Some(l) => Region {
                line: l,
                col: indent(lines[l]),
                end,
            },
            None => Region {
                line,
                col: lines[line].len(),
                end: line + 1,
            },
        }
    };
    Some((line, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
# leading comment
services:
  - name: backend
    port: 7000
    endpoints:
      - address: 127.0.0.1:9001
      -
        address: 127.0.0.1:9002
        weight: 3
  - name: web
    dependencies: [backend, db]
routes:
- name: canary
  service: backend
  match:
    path: {prefix: /api}
    headers:
      - {name: x-canary, exact: \"true\"}
  destinations:
    - service: backend-v2
      weight: 90
    - {service: backend, weight: 10}
";

    #[test]
    fn finds_nested_block_entries() {
        assert_eq!(line_of(DOC, "services"), 2);
        assert_eq!(line_of(DOC, "services[0]"), 3);
        assert_eq!(line_of(DOC, "services[0].name"), 3);
        assert_eq!(line_of(DOC, "services[0].port"), 4);
        assert_eq!(line_of(DOC, "services[0].endpoints[0].address"), 6);
        assert_eq!(line_of(DOC, "services[0].endpoints[1].address"), 8);
        assert_eq!(line_of(DOC, "services[0].endpoints[1].weight"), 9);
        assert_eq!(line_of(DOC, "services[1].name"), 10);
        assert_eq!(line_of(DOC, "services[1].dependencies[1]"), 11);
        assert_eq!(line_of(DOC, "routes[0].service"), 14);
        assert_eq!(line_of(DOC, "routes[0].match.path.prefix"), 16);
        assert_eq!(line_of(DOC, "routes[0].match.headers[0].exact"), 18);
        assert_eq!(line_of(DOC, "routes[0].destinations[0].weight"), 21);
        assert_eq!(line_of(DOC, "routes[0].destinations[1].service"), 22);
    }

    #[test]
    fn missing_entries_fall_back_to_the_deepest_ancestor() {
        assert_eq!(line_of(DOC, "services[0].protocol"), 3);
        assert_eq!(line_of(DOC, "services[5].name"), 2);
        assert_eq!(line_of(DOC, "nothing"), 2);
        assert_eq!(line_of("", "services"), 1);
    }

    #[test]
    fn parses_segments() {
        assert_eq!(
            segments("a[1][2].b"),
            vec![
                Segment::Key("a"),
                Segment::Index(1),
                Segment::Index(2),
                Segment::Key("b")
            ]
        );
    }
}
