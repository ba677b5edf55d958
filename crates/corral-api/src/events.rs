//! Events as kubelet and the controllers record them: `Recorder` folds repeats of the same
//! reason and message about the same object into one Event whose count grows (client-go's
//! correlator, simplified), and hands out the Events to write. It does no IO; the caller
//! writes what `take` returns and, when that fails, records nothing lost: the Events stay
//! pending until the next `take`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};

use crate::meta::{JsonAt, str_at};

/// The object an Event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Involved {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The part of the object, as `spec.containers{app}`.
    pub field_path: String,
}

impl Involved {
    /// A pod, or one of its containers when `container` is not empty.
    pub fn pod(pod: &Value, container: &str) -> Self {
        let text = |p: &str| pod.at(p).and_then(Value::as_str).unwrap_or_default().to_string();
        let init = pod
            .at("/spec/initContainers")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(container)));
        Self {
            api_version: "v1".into(),
            kind: "Pod".into(),
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
            uid: text("/metadata/uid"),
            field_path: match (container, init) {
                ("", _) => String::new(),
                (c, true) => format!("spec.initContainers{{{c}}}"),
                (c, false) => format!("spec.containers{{{c}}}"),
            },
        }
    }

    /// Any object, from its own apiVersion, kind and metadata.
    pub fn object(obj: &Value) -> Self {
        let text = |p: &str| obj.at(p).and_then(Value::as_str).unwrap_or_default().to_string();
        Self {
            api_version: text("/apiVersion"),
            kind: text("/kind"),
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
            uid: text("/metadata/uid"),
            field_path: String::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    uid: String,
    field_path: String,
    warning: bool,
    reason: String,
    message: String,
}

#[derive(Clone, Debug)]
struct Entry {
    involved: Involved,
    name: String,
    count: u64,
    first: i64,
    last: i64,
    /// Its place in `Recorder::quiet`.
    quiet_at: (i64, u64),
}

/// Folds and keeps Events until they are written. Bounded: past `limit` distinct Events, the
/// longest quiet ones are forgotten (a repeat then starts a new Event, as after a restart).
pub struct Recorder {
    component: String,
    host: String,
    limit: usize,
    entries: HashMap<Key, Entry>,
    pending: BTreeSet<Key>,
    /// Every entry by when it last happened (and then by when it was recorded), so the
    /// quietest is found without looking at the rest.
    quiet: BTreeMap<(i64, u64), Key>,
    /// Recordings so far: orders entries that last happened in the same second.
    recorded: u64,
    minted: u64,
    /// From the component and host: part of every Event name this recorder mints.
    tag: u16,
}

/// Events kept for folding by default.
pub const DEFAULT_LIMIT: usize = 4096;

impl Recorder {
    /// `component` is the source (`kubelet`, `default-scheduler`), `host` the node or server.
    pub fn new(component: &str, host: &str) -> Self {
        Self {
            component: component.into(),
            host: host.into(),
            limit: DEFAULT_LIMIT,
            entries: HashMap::new(),
            pending: BTreeSet::new(),
            quiet: BTreeMap::new(),
            recorded: 0,
            minted: 0,
            tag: format!("{component}/{host}")
                .bytes()
                .fold(0x811c_9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x0100_0193)) as u16,
        }
    }

    pub fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit.max(1);
        self
    }

    /// Records that something happened at `now` (seconds since the epoch).
    pub fn record(&mut self, involved: &Involved, warning: bool, reason: &str, message: &str, now: i64) {
        let key = Key {
            uid: involved.uid.clone(),
            field_path: involved.field_path.clone(),
            warning,
            reason: reason.into(),
            message: message.into(),
        };
        self.recorded += 1;
        let quiet_at = (now, self.recorded);
        if let Some(e) = self.entries.get_mut(&key) {
            e.count += 1;
            e.last = now;
            self.quiet.remove(&e.quiet_at);
            e.quiet_at = quiet_at;
        } else {
            if self.entries.len() >= self.limit {
                self.forget_quietest();
            }
            self.minted += 1;
            // Unique per recorder and time (client-go names Events `<object>.<nanos hex>`):
            // the recorder's own tag keeps the scheduler's and a kubelet's Events of the same
            // second apart.
            let name = format!("{}.{:x}{:04x}{:04x}", involved.name, now, self.tag, self.minted & 0xffff);
            let entry = Entry { involved: involved.clone(), name, count: 1, first: now, last: now, quiet_at };
            self.entries.insert(key.clone(), entry);
        }
        self.quiet.insert(quiet_at, key.clone());
        self.pending.insert(key);
    }

    fn forget_quietest(&mut self) {
        if let Some((_, k)) = self.quiet.pop_first() {
            self.entries.remove(&k);
            self.pending.remove(&k);
        }
    }

    /// How many Events wait to be written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Up to `max` Events to write now, each whole (its count so far). They stay pending
    /// until `written` says they were.
    pub fn peek(&self, max: usize) -> Vec<Value> {
        self.pending.iter().take(max).filter_map(|k| Some(self.event(k, self.entries.get(k)?))).collect()
    }

    /// Marks as written the Events `peek` gave, unless they changed since.
    pub fn written(&mut self, events: &[Value]) {
        let written: HashMap<&str, u64> = events
            .iter()
            .map(|w| (str_at(w, "/metadata/name"), w.get("count").and_then(Value::as_u64).unwrap_or_default()))
            .collect();
        let entries = &self.entries;
        self.pending
            .retain(|k| entries.get(k).is_none_or(|e| written.get(e.name.as_str()).is_none_or(|c| *c != e.count)));
    }

    fn event(&self, key: &Key, e: &Entry) -> Value {
        let time = |s: i64| crate::meta::rfc3339(s);
        let mut involved = json!({
            "apiVersion": e.involved.api_version,
            "kind": e.involved.kind,
            "name": e.involved.name,
            "uid": e.involved.uid,
        });
        if !e.involved.namespace.is_empty() {
            involved["namespace"] = json!(e.involved.namespace);
        }
        if !e.involved.field_path.is_empty() {
            involved["fieldPath"] = json!(e.involved.field_path);
        }
        let namespace = if e.involved.namespace.is_empty() { "default" } else { &e.involved.namespace };
        json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": e.name, "namespace": namespace},
            "involvedObject": involved,
            "reason": key.reason,
            "message": key.message,
            "source": {"component": self.component, "host": self.host},
            "firstTimestamp": time(e.first),
            "lastTimestamp": time(e.last),
            "count": e.count,
            "type": if key.warning { "Warning" } else { "Normal" },
            "eventTime": null,
            "reportingComponent": self.component,
            "reportingInstance": self.host,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({"metadata": {"name": "web", "namespace": "shop", "uid": "u1"},
               "spec": {"initContainers": [{"name": "setup"}], "containers": [{"name": "app"}]}})
    }

    #[test]
    fn repeats_fold_into_one_event_whose_count_grows() {
        let mut r = Recorder::new("kubelet", "n1");
        let app = Involved::pod(&pod(), "app");
        r.record(&app, true, "BackOff", "Back-off restarting failed container app", 100);
        r.record(&app, true, "BackOff", "Back-off restarting failed container app", 110);
        r.record(&Involved::pod(&pod(), "setup"), false, "Started", "Started container setup", 90);
        let events = r.peek(10);
        assert_eq!(events.len(), 2);
        let backoff = events.iter().find(|e| e["reason"] == "BackOff").unwrap();
        assert_eq!(backoff["count"], 2);
        assert_eq!(backoff["type"], "Warning");
        assert_eq!(backoff["involvedObject"]["fieldPath"], "spec.containers{app}");
        assert_eq!(backoff["metadata"]["namespace"], "shop");
        assert_eq!(backoff["firstTimestamp"], crate::meta::rfc3339(100));
        assert_eq!(backoff["lastTimestamp"], crate::meta::rfc3339(110));
        let started = events.iter().find(|e| e["reason"] == "Started").unwrap();
        assert_eq!(started["involvedObject"]["fieldPath"], "spec.initContainers{setup}");
        assert!(backoff["metadata"]["name"].as_str().unwrap().starts_with("web."));
        assert_ne!(backoff["metadata"]["name"], started["metadata"]["name"]);
        let mut scheduler = Recorder::new("default-scheduler", "s1");
        scheduler.record(&Involved::pod(&pod(), ""), false, "Scheduled", "assigned", 90);
        let mut kubelet = Recorder::new("kubelet", "n1");
        kubelet.record(&Involved::pod(&pod(), "app"), false, "Pulled", "present", 90);
        assert_ne!(
            scheduler.peek(1)[0]["metadata"]["name"],
            kubelet.peek(1)[0]["metadata"]["name"],
            "recorders never collide"
        );
    }

    #[test]
    fn written_events_leave_the_queue_unless_they_changed_meanwhile() {
        let mut r = Recorder::new("kubelet", "n1");
        let app = Involved::pod(&pod(), "app");
        r.record(&app, false, "Pulled", "present", 1);
        let first = r.peek(10);
        r.record(&app, false, "Pulled", "present", 2);
        r.written(&first);
        assert_eq!(r.pending(), 1, "the repeat is still to be written");
        let second = r.peek(10);
        assert_eq!(second[0]["count"], 2);
        assert_eq!(second[0]["metadata"]["name"], first[0]["metadata"]["name"], "the same Event, updated");
        r.written(&second);
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn the_recorder_is_bounded() {
        let mut r = Recorder::new("kubelet", "n1").with_limit(2);
        let app = Involved::pod(&pod(), "app");
        for (i, reason) in ["A", "B", "C"].iter().enumerate() {
            r.record(&app, false, reason, "m", i as i64);
        }
        let reasons: Vec<Value> = r.peek(10).iter().map(|e| e["reason"].clone()).collect();
        assert_eq!(reasons, [json!("B"), json!("C")]);

        // A repeat keeps its Event: the quietest one goes instead.
        r.record(&app, false, "B", "m", 3);
        r.record(&app, false, "D", "m", 4);
        let reasons: Vec<Value> = r.peek(10).iter().map(|e| e["reason"].clone()).collect();
        assert_eq!(reasons, [json!("B"), json!("D")]);
    }
}
