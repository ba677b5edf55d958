//! Container logs as `kubectl logs` shows them, from the CRI log files the runtime writes:
//! lines of `<RFC 3339 time> <stdout|stderr> <P|F> <text>`, P for a partial line continued
//! on the next. Options: tail, since, timestamps, a byte limit.

use std::path::{Path, PathBuf};

/// What the client asked for.
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    /// Lines from the end (-1: all).
    pub tail_lines: i64,
    /// Only lines at or after this Unix time (0: all).
    pub since_unix: i64,
    pub timestamps: bool,
    /// Stop after this many bytes (0: no limit).
    pub limit_bytes: i64,
}

/// One line of a CRI log file.
#[derive(Debug, PartialEq)]
pub struct Entry<'a> {
    pub time: &'a str,
    pub partial: bool,
    pub text: &'a [u8],
}

pub fn parse(line: &[u8]) -> Option<Entry<'_>> {
    let mut parts = line.splitn(4, |b| *b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let _stream = parts.next()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or_default();
    Some(Entry { time, partial: tag.first() == Some(&b'P'), text })
}

fn unix_of(time: &str) -> i64 {
    corral_api::meta::parse_rfc3339(time).unwrap_or(0)
}

/// Writes one entry as kubectl shows it; false once the byte limit is reached.
fn emit(e: &Entry<'_>, opts: &LogOptions, at_line_start: bool, out: &mut Vec<u8>, written: &mut i64) -> bool {
    let before = out.len();
    if opts.timestamps && at_line_start {
        out.extend_from_slice(e.time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(e.text);
    if !e.partial {
        out.push(b'\n');
    }
    *written += (out.len() - before) as i64;
    if opts.limit_bytes > 0 && *written >= opts.limit_bytes {
        out.truncate(out.len() - (*written - opts.limit_bytes) as usize);
        return false;
    }
    true
}

/// Renders a whole log (complete lines) by the options; the bool says whether the byte
/// limit was reached.
pub fn render(content: &[u8], opts: &LogOptions) -> (Vec<u8>, bool) {
    let entries: Vec<Entry<'_>> = content
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(parse)
        .filter(|e| opts.since_unix == 0 || unix_of(e.time) >= opts.since_unix)
        .collect();
    // Tail counts whole lines: a run of partial entries and the one that ends it.
    let mut starts: Vec<usize> = Vec::new();
    let mut at_start = true;
    for (i, e) in entries.iter().enumerate() {
        if at_start {
            starts.push(i);
        }
        at_start = !e.partial;
    }
    let first = match opts.tail_lines {
        n if n >= 0 => starts.len().saturating_sub(n as usize),
        _ => 0,
    };
    let from = starts.get(first).copied().unwrap_or(entries.len());
    let mut out = Vec::new();
    let mut written = 0;
    let mut at_start = true;
    for e in &entries[from..] {
        if !emit(e, opts, at_start, &mut out, &mut written) {
            return (out, true);
        }
        at_start = !e.partial;
    }
    (out, false)
}

/// The log files of a container, oldest attempt first.
pub fn files(log_root: &Path, namespace: &str, pod: &str, uid: &str, container: &str) -> Vec<PathBuf> {
    let dir = log_root.join(format!("{namespace}_{pod}_{uid}")).join(container);
    let mut files: Vec<(u32, PathBuf)> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name.strip_suffix(".log")?.parse().ok()?, e.path()))
        })
        .collect();
    files.sort();
    files.into_iter().map(|(_, p)| p).collect()
}

/// Follows a growing log from `offset`: the complete lines added since, rendered, and the
/// new offset.
pub fn more(path: &Path, offset: u64, opts: &LogOptions) -> std::io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let all = LogOptions { tail_lines: -1, ..opts.clone() };
    Ok((render(&buf[..complete], &all).0, offset + complete as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &[u8] = b"2026-01-01T00:00:01.5Z stdout F one\n\
2026-01-01T00:00:02.5Z stderr F two\n\
2026-01-01T00:00:03.5Z stdout P thr\n\
2026-01-01T00:00:03.6Z stdout F ee\n\
2026-01-01T00:00:04.5Z stdout F four\n";

    fn opts() -> LogOptions {
        LogOptions { tail_lines: -1, ..Default::default() }
    }

    #[test]
    fn a_log_renders_whole_lines_with_partials_joined() {
        assert_eq!(render(LOG, &opts()).0, b"one\ntwo\nthree\nfour\n");
        let tail = LogOptions { tail_lines: 2, ..opts() };
        assert_eq!(render(LOG, &tail).0, b"three\nfour\n", "a partial run counts as one line");
        let stamped = LogOptions { timestamps: true, tail_lines: 2, ..opts() };
        assert_eq!(render(LOG, &stamped).0, b"2026-01-01T00:00:03.5Z three\n2026-01-01T00:00:04.5Z four\n");
    }

    #[test]
    fn since_and_limit_cut_the_log() {
        let since = LogOptions { since_unix: unix_of("2026-01-01T00:00:04Z"), ..opts() };
        assert_eq!(render(LOG, &since).0, b"four\n");
        let limited = LogOptions { limit_bytes: 6, ..opts() };
        assert_eq!(render(LOG, &limited), (b"one\ntw".to_vec(), true));
        assert_eq!(render(b"", &opts()).0, b"");
        assert_eq!(render(b"garbage\n", &opts()).0, b"", "a line not in CRI's format is skipped");
    }

    #[test]
    fn following_reads_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, b"2026-01-01T00:00:01Z stdout F a\n2026-01-01T00:00:02Z stdout F b").unwrap();
        let (out, offset) = more(&path, 0, &opts()).unwrap();
        assert_eq!(out, b"a\n");
        std::fs::write(&path, b"2026-01-01T00:00:01Z stdout F a\n2026-01-01T00:00:02Z stdout F b\n").unwrap();
        assert_eq!(more(&path, offset, &opts()).unwrap().0, b"b\n");
    }
}
