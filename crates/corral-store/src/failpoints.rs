//! Failpoints for the chaos suite, armed from the `FAILPOINTS` environment variable
//! (`name=actions;name=actions`, the `fail` crate's action syntax, e.g.
//! `raft-log-before-append=30*off->panic`). Compiled in only with the `failpoints` feature.
//!
//! A `panic` action crashes the process on the spot (abort, as `kill -9` would, with a line
//! `failpoint fired: <name>` on stderr first), wherever the failpoint sits: a panic inside a
//! task would otherwise only end that task.
//!
//! The points: `raft-log-before-append`, `raft-log-after-fsync`, `raft-log-purge`,
//! `sm-before-batch`, `sm-after-batch`, `sm-membership-apply`, `snapshot-build`,
//! `snapshot-install-before-restore`, `mvcc-compact`.

/// Every failpoint name, for the chaos suite to choose from.
pub const NAMES: &[&str] = &[
    "raft-log-before-append",
    "raft-log-after-fsync",
    "raft-log-purge",
    "sm-before-batch",
    "sm-after-batch",
    "sm-membership-apply",
    "snapshot-build",
    "snapshot-install-before-restore",
    "mvcc-compact",
];

/// Arms what `FAILPOINTS` names. Returns the names armed; an error when the variable is set
/// but this build has no failpoints, or names an unknown point or a bad action.
pub fn arm_from_env() -> Result<Vec<String>, String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(Vec::new()) };
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    arm(&spec)
}

#[cfg(feature = "failpoints")]
fn arm(spec: &str) -> Result<Vec<String>, String> {
    let mut armed = Vec::new();
    for part in spec.split(';').filter(|p| !p.trim().is_empty()) {
        let (name, actions) =
            part.split_once('=').ok_or_else(|| format!("FAILPOINTS: {part:?} is not name=actions"))?;
        let name = name.trim();
        if !NAMES.contains(&name) {
            return Err(format!("FAILPOINTS: no failpoint {name:?}; known: {}", NAMES.join(", ")));
        }
        fail::cfg(name, actions.trim()).map_err(|e| format!("FAILPOINTS: {name}: {e}"))?;
        armed.push(name.to_string());
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if let Some(rest) = message.strip_prefix("failpoint ") {
            let name = rest.split_whitespace().next().unwrap_or(rest);
            eprintln!("failpoint fired: {name}");
            std::process::abort();
        }
        previous(info);
    }));
    Ok(armed)
}

#[cfg(not(feature = "failpoints"))]
fn arm(_spec: &str) -> Result<Vec<String>, String> {
    Err("FAILPOINTS is set, but this corral was built without failpoints: \
         cargo build -p corral --features failpoints"
        .into())
}
