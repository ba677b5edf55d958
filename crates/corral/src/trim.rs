//! Giving back the pages of code an agent never runs.
//!
//! One binary carries the server (the store, the API server, the controllers) and the agent,
//! and links RocksDB. An agent touches little of that, but the kernel maps file pages around
//! every fault (64 KiB at a time) and the dynamic loader and start-up touch more: about
//! 22 MiB of the binary and its libraries stay mapped in an agent that runs a few MiB of
//! code. After start-up the agent asks the kernel to unmap the pages of the read-only
//! segments of every loaded object (`MADV_DONTNEED`); what it runs afterwards comes back on
//! the next fault, from the page cache. The pages stay cached for the servers on the same
//! machine.
//!
//! Only bytes that come back unchanged are dropped:
//! - the non-writable `PT_LOAD` segments of objects the dynamic loader lists (code and
//!   constants), found with `dl_iterate_phdr` and advised inside its callback, which holds
//!   the loader's lock: no object is mapped or unmapped meanwhile;
//! - never a segment that overlaps `PT_GNU_RELRO` (relocated by the loader, then made
//!   read-only: dropping it would bring back unrelocated bytes);
//! - never one that overlaps a mapping with pages of its own, in memory or swapped
//!   (`Anonymous:` or `Swap:` above 0 in `/proc/self/smaps`: a debugger's breakpoint, an
//!   uprobe).
//!
//! Binaries and libraries must be replaced by rename (as cargo, install and package managers
//! do), not rewritten in place: a page that faults back reads the file as it is then. (The
//! kernel may already reclaim and refault these pages at any time; this makes it certain.)

/// A range of addresses, `start..end`.
pub type Range = (usize, usize);

/// One program header, as the loader gives it: type, flags, virtual address, size in memory.
#[derive(Debug, Clone, Copy)]
pub struct Phdr {
    pub kind: u32,
    pub flags: u32,
    pub vaddr: usize,
    pub memsz: usize,
}

/// The whole pages of an object's read-only `PT_LOAD` segments (loaded at `base`) that do
/// not touch its RELRO segment.
pub fn read_only_pages(base: usize, phdrs: &[Phdr], page: usize) -> Vec<Range> {
    let span = |p: &Phdr| (base + p.vaddr, base + p.vaddr + p.memsz);
    let relro: Vec<Range> = phdrs.iter().filter(|p| p.kind == libc::PT_GNU_RELRO).map(span).collect();
    phdrs
        .iter()
        .filter(|p| p.kind == libc::PT_LOAD && p.flags & libc::PF_W == 0)
        .map(span)
        .filter(|r| !relro.iter().any(|x| overlaps(*r, *x)))
        .map(|(start, end)| (start.div_ceil(page) * page, end / page * page))
        .filter(|(start, end)| start < end)
        .collect()
}

/// Mappings of an smaps text with pages of their own (copied on write, in memory or
/// swapped): never dropped.
pub fn own_pages(smaps: &str) -> Vec<Range> {
    let mut out = Vec::new();
    let mut current: Option<Range> = None;
    for line in smaps.lines() {
        if let Some(range) = header(line) {
            current = Some(range);
            continue;
        }
        let Some(range) = current else { continue };
        let kib = field_kib(line, "Anonymous:").or_else(|| field_kib(line, "Swap:"));
        if kib.is_some_and(|k| k > 0) {
            out.push(range);
            current = None; // listed once
        }
    }
    out
}

fn overlaps(a: Range, b: Range) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// `start-end perms offset dev inode [path]`, or None for a field line.
fn header(line: &str) -> Option<Range> {
    let mut parts = line.split_whitespace();
    let (start, end) = parts.next()?.split_once('-')?;
    let range = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    let _perms = parts.next().filter(|p| p.len() == 4)?;
    Some(range)
}

fn field_kib(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// What the loader's callback needs and counts.
struct Walk {
    own: Vec<Range>,
    page: usize,
    advised: usize,
}

unsafe extern "C" fn advise_object(info: *mut libc::dl_phdr_info, _size: libc::size_t, data: *mut libc::c_void) -> i32 {
    // SAFETY: the loader passes a valid info for the duration of the call, and `data` is
    // the `Walk` that `drop_file_pages` lent for the whole `dl_iterate_phdr`.
    let (info, walk) = unsafe { (&*info, &mut *(data as *mut Walk)) };
    if info.dlpi_phdr.is_null() {
        return 0;
    }
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers of a loaded object.
    let raw = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let phdrs: Vec<Phdr> = raw
        .iter()
        .map(|p| Phdr { kind: p.p_type, flags: p.p_flags, vaddr: p.p_vaddr as usize, memsz: p.p_memsz as usize })
        .collect();
    for range in read_only_pages(info.dlpi_addr as usize, &phdrs, walk.page) {
        if walk.own.iter().any(|o| overlaps(range, *o)) {
            continue;
        }
        // SAFETY: the range is whole pages of a read-only segment of an object the loader
        // holds mapped (its lock is held during this callback), with no page of its own:
        // after MADV_DONTNEED every access faults the same bytes back from the file.
        let rc = unsafe { libc::madvise(range.0 as *mut libc::c_void, range.1 - range.0, libc::MADV_DONTNEED) };
        if rc == 0 {
            walk.advised += range.1 - range.0;
        }
    }
    0
}

/// Unmaps the pages of the read-only segments of every loaded object; returns how many
/// bytes were advised (mapped or not).
pub fn drop_file_pages() -> std::io::Result<usize> {
    let own = own_pages(&std::fs::read_to_string("/proc/self/smaps")?);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
    let mut walk = Walk { own, page, advised: 0 };
    // SAFETY: the callback only reads what the loader passes and writes the `Walk`, which
    // outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(advise_object), &mut walk as *mut Walk as *mut libc::c_void) };
    Ok(walk.advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: usize = 4096;

    fn load(flags: u32, vaddr: usize, memsz: usize) -> Phdr {
        Phdr { kind: libc::PT_LOAD, flags, vaddr, memsz }
    }

    #[test]
    fn read_only_segments_in_whole_pages_and_never_relro() {
        let (r, rx, rw) = (libc::PF_R, libc::PF_R | libc::PF_X, libc::PF_R | libc::PF_W);
        let phdrs = [
            load(r, 0, 0x5000),
            load(rx, 0x5100, 0x10000), // not page-aligned: trimmed inwards
            load(r, 0x16000, 0x3000),  // a read-only segment holding RELRO (some linkers)
            load(rw, 0x20000, 0x2000), // data
            Phdr { kind: libc::PT_GNU_RELRO, flags: r, vaddr: 0x17000, memsz: 0x800 },
        ];
        let got = read_only_pages(0x7f00_0000_0000, &phdrs, PAGE);
        let base = 0x7f00_0000_0000;
        assert_eq!(got, vec![(base, base + 0x5000), (base + 0x6000, base + 0x15000)]);
    }

    #[test]
    fn mappings_with_pages_of_their_own_in_memory_or_swapped_are_listed() {
        let smaps = "\
55e0a0400000-55e0a1400000 r-xp 00400000 fe:01 131 /usr/local/bin/corral
Rss:               11000 kB
Anonymous:             0 kB
Swap:                  0 kB
VmFlags: rd ex mr mw me dw
55e0a1400000-55e0a1500000 r--p 01400000 fe:01 131 /usr/local/bin/corral
Rss:                  12 kB
Anonymous:             0 kB
Swap:                 96 kB
VmFlags: rd mr mw me ac
7f0000000000-7f0000100000 r-xp 00000000 fe:01 77 /usr/lib/libx.so
Anonymous:             4 kB
Swap:                  0 kB
";
        assert_eq!(own_pages(smaps), vec![(0x55e0a1400000, 0x55e0a1500000), (0x7f0000000000, 0x7f0000100000)]);
    }

    #[test]
    fn the_pages_of_this_test_binary_can_be_dropped_and_it_runs_on() {
        let advised = drop_file_pages().unwrap();
        assert!(advised > 1 << 20, "a test binary has more than 1 MiB of code: {advised}");
        // Code and constants fault back in: formatting and hashing still work.
        let s = format!("{:?}", std::collections::HashMap::from([(1, "one")]));
        assert_eq!(s, "{1: \"one\"}");
        assert!(drop_file_pages().unwrap() > 0, "and again");
    }
}
