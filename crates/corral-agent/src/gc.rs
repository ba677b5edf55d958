//! Garbage collection as kubelet does it. Dead containers: every minute, each container of
//! a pod keeps its newest run and the one before (`kubectl logs --previous`); older exited
//! runs go. Images: every five minutes, when the image filesystem is fuller than the high
//! threshold (85%), unused images go, least recently used first, until it is below the low
//! one (80%). Images the node was given at start (its images directory, the sandbox image)
//! are pinned, as k3s pins its air-gap images: with no registry, they could not come back.
//! The choices are pure functions; `Worker::collect_*` carry them out.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::sync::{PodView, State};

#[derive(Clone, Debug)]
pub struct GcPolicy {
    pub high_percent: u64,
    pub low_percent: u64,
    /// An image younger than this (since the agent first saw it) is never removed: it was
    /// probably pulled for a container about to start.
    pub min_image_age: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self { high_percent: 85, low_percent: 80, min_image_age: Duration::from_secs(120) }
    }
}

pub const CONTAINERS_EVERY: Duration = Duration::from_secs(60);
pub const IMAGES_EVERY: Duration = Duration::from_secs(300);

/// Exited runs to remove: all but the two newest runs of each container of a pod.
pub fn dead_containers(views: &HashMap<String, PodView>) -> Vec<String> {
    let mut dead = Vec::new();
    for view in views.values() {
        let mut by_name: HashMap<&str, Vec<_>> = HashMap::new();
        for c in &view.containers {
            by_name.entry(c.name.as_str()).or_default().push(c);
        }
        for runs in by_name.values_mut() {
            runs.sort_by_key(|c| std::cmp::Reverse((c.started_at.max(c.finished_at), c.attempt)));
            dead.extend(runs.iter().skip(2).filter(|c| c.state == State::Exited).map(|c| c.id.clone()));
        }
    }
    dead
}

/// An image as the collector weighs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageUse {
    pub id: String,
    pub size: u64,
    /// When a container last used it, or when the agent first saw it (ns since the epoch).
    pub last_used: i64,
    pub first_seen: i64,
    pub in_use: bool,
    pub pinned: bool,
}

/// The images to remove so that `used` of `capacity` bytes falls to the low threshold, when
/// it is above the high one; empty otherwise.
pub fn images_to_free(images: &[ImageUse], used: u64, capacity: u64, policy: &GcPolicy, now: i64) -> Vec<String> {
    if capacity == 0 || used * 100 < policy.high_percent * capacity {
        return Vec::new();
    }
    let target = capacity * policy.low_percent / 100;
    let mut to_free = used.saturating_sub(target);
    let min_age = policy.min_image_age.as_nanos() as i64;
    let mut candidates: Vec<&ImageUse> =
        images.iter().filter(|i| !i.in_use && !i.pinned && now - i.first_seen >= min_age).collect();
    candidates.sort_by_key(|i| (i.last_used, i.first_seen));
    let mut chosen = Vec::new();
    for image in candidates {
        if to_free == 0 {
            break;
        }
        to_free = to_free.saturating_sub(image.size);
        chosen.push(image.id.clone());
    }
    chosen
}

/// When each image was first seen and last used, kept by the agent between rounds.
#[derive(Debug, Default)]
pub struct ImageHistory {
    seen: HashMap<String, (i64, i64)>,
}

impl ImageHistory {
    /// Brings the history up to date with the images present and those in use at `now`;
    /// returns them as the collector weighs them.
    pub fn update(&mut self, present: &[(String, u64, bool)], in_use: &HashSet<String>, now: i64) -> Vec<ImageUse> {
        self.seen.retain(|id, _| present.iter().any(|(p, _, _)| p == id));
        present
            .iter()
            .map(|(id, size, pinned)| {
                let entry = self.seen.entry(id.clone()).or_insert((now, now));
                let in_use = in_use.contains(id);
                if in_use {
                    entry.1 = now;
                }
                ImageUse {
                    id: id.clone(),
                    size: *size,
                    first_seen: entry.0,
                    last_used: entry.1,
                    in_use,
                    pinned: *pinned,
                }
            })
            .collect()
    }
}

/// Used and total bytes of the filesystem holding `path`.
pub fn filesystem_usage(path: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let block = st.f_frsize as u64;
    let capacity = st.f_blocks as u64 * block;
    let available = st.f_bavail as u64 * block;
    Ok((capacity.saturating_sub(available), capacity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::{ContainerView, SandboxView};

    const S: i64 = 1_000_000_000;

    fn run(id: &str, name: &str, attempt: u32, state: State, started: i64) -> ContainerView {
        ContainerView {
            id: id.into(),
            sandbox_id: "sb".into(),
            name: name.into(),
            attempt,
            init: false,
            state,
            exit_code: 1,
            reason: String::new(),
            message: String::new(),
            started_at: started,
            finished_at: if state == State::Exited { started + 1 } else { 0 },
            image_ref: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn each_container_keeps_its_newest_run_and_the_one_before() {
        let view = PodView {
            sandboxes: vec![SandboxView { id: "sb".into(), attempt: 0, ready: true, ip: String::new() }],
            containers: vec![
                run("a0", "app", 0, State::Exited, 10),
                run("a1", "app", 1, State::Exited, 20),
                run("a2", "app", 2, State::Exited, 30),
                run("a3", "app", 3, State::Running, 40),
                run("s0", "sidecar", 0, State::Exited, 10),
            ],
        };
        let mut dead = dead_containers(&HashMap::from([("u".to_string(), view)]));
        dead.sort();
        assert_eq!(dead, ["a0", "a1"]);
    }

    fn image(id: &str, size: u64, last_used: i64, in_use: bool, pinned: bool) -> ImageUse {
        ImageUse { id: id.into(), size, last_used, first_seen: 0, in_use, pinned }
    }

    #[test]
    fn images_go_least_recently_used_first_from_the_high_threshold_to_the_low() {
        let policy = GcPolicy::default();
        let now = 1000 * S;
        let images = [
            image("old", 30, 10 * S, false, false),
            image("older", 30, 5 * S, false, false),
            image("busy", 300, S, true, false),
            image("pause", 300, 0, false, true),
            image("recent", 30, 900 * S, false, false),
        ];
        assert!(images_to_free(&images, 840, 1000, &policy, now).is_empty(), "below 85%");
        // 900 of 1000 used: 100 bytes to free for 80%.
        assert_eq!(images_to_free(&images, 900, 1000, &policy, now), ["older", "old", "recent"]);
        assert_eq!(images_to_free(&images, 860, 1000, &policy, now), ["older", "old"]);
        let young = [ImageUse { first_seen: now - S, ..image("new", 100, 0, false, false) }];
        assert!(images_to_free(&young, 900, 1000, &policy, now).is_empty(), "just pulled");
    }

    #[test]
    fn the_history_remembers_when_images_were_last_used() {
        let mut h = ImageHistory::default();
        let present = [("a".to_string(), 1, false), ("b".to_string(), 1, false)];
        h.update(&present, &HashSet::from(["a".to_string()]), 10);
        let now = h.update(&present, &HashSet::new(), 20);
        assert_eq!((now[0].last_used, now[0].first_seen, now[1].last_used), (10, 10, 10));
        let later = h.update(&present, &HashSet::from(["b".to_string()]), 30);
        assert_eq!(later[1].last_used, 30);
    }
}
