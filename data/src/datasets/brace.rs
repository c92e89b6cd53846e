//! Shell-style brace expansion for shard lists, as WebDataset uses it:
//! `shards/{0000..0099}.tar` (numeric range, zero padding kept), `{train,val}/x.tar`
//! (alternatives, may nest), several braces multiply out (left to right).

use crate::error::DataError;

/// Upper bound on the number of expanded names (guards against typos like `{0..99999999}`).
pub const MAX_EXPANSION: usize = 1_000_000;

/// Expands every brace group of `pattern`, in order. A pattern without braces expands to
/// itself. Errors name the pattern: unbalanced braces, too many results.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>, DataError> {
    let err = |message: String| DataError::Spec {
        spec: pattern.to_string(),
        message,
    };
    let out = expand(pattern).map_err(err)?;
    Ok(out)
}

fn expand(p: &str) -> Result<Vec<String>, String> {
    let Some(open) = p.find('{') else {
        if p.contains('}') {
            return Err("`}` without a matching `{`".into());
        }
        return Ok(vec![p.to_string()]);
    };
    let close = matching_close(p, open).ok_or("`{` without a matching `}`")?;
    let prefix = &p[..open];
    if prefix.contains('}') {
        return Err("`}` without a matching `{`".into());
    }
    let body = &p[open + 1..close];
    let alternatives = match numeric_range(body)? {
        Some(items) => items,
        None => {
            let parts = split_top_level(body);
            if parts.len() < 2 {
                // `{x}` is not an expansion in the shell either: keep it literally.
                expand(body)?
                    .into_iter()
                    .map(|b| format!("{{{b}}}"))
                    .collect()
            } else {
                let mut v = Vec::new();
                for part in parts {
                    v.extend(expand(part)?);
                }
                v
            }
        }
    };
    let suffixes = expand(&p[close + 1..])?;
    if alternatives.len().saturating_mul(suffixes.len()) > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} names"));
    }
    let mut out = Vec::with_capacity(alternatives.len() * suffixes.len());
    for a in &alternatives {
        for s in &suffixes {
            out.push(format!("{prefix}{a}{s}"));
        }
    }
    Ok(out)
}

fn matching_close(p: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in p[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(open + i);
                }
            }
            _ => {}
        }
    }
    None
}

fn split_top_level(body: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// `a..b` with integers a, b: the range (either direction); padded to the wider bound's
/// width when either bound has a leading zero (`0008..0011` -> `0008 0009 0010 0011`).
fn numeric_range(body: &str) -> Result<Option<Vec<String>>, String> {
    let Some((a, b)) = body.split_once("..") else {
        return Ok(None);
    };
    let is_int = |s: &str| {
        let d = s.strip_prefix('-').unwrap_or(s);
        !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())
    };
    if !is_int(a) || !is_int(b) {
        return Ok(None);
    }
    let (x, y): (i64, i64) = (
        a.parse()
            .map_err(|_| format!("range bound `{a}` too large"))?,
        b.parse()
            .map_err(|_| format!("range bound `{b}` too large"))?,
    );
    let padded = |s: &str| {
        let d = s.strip_prefix('-').unwrap_or(s);
        d.len() > 1 && d.starts_with('0')
    };
    let width = if padded(a) || padded(b) {
        a.len().max(b.len())
    } else {
        0
    };
    // In i128: the distance between two i64 bounds can exceed i64.
    let count = (i128::from(x) - i128::from(y)).unsigned_abs() + 1;
    if count > MAX_EXPANSION as u128 {
        return Err(format!(
            "range {a}..{b} has more than {MAX_EXPANSION} values"
        ));
    }
    let count = count as usize;
    let step = if y >= x { 1 } else { -1 };
    Ok(Some(
        (0..count as i64)
            .map(|i| {
                let v = x + i * step;
                if v < 0 {
                    format!("-{:0w$}", -v, w = width.saturating_sub(1))
                } else {
                    format!("{v:0width$}")
                }
            })
            .collect(),
    ))
}
