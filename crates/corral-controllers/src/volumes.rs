//! The PersistentVolume binder: a pending claim is bound to the smallest Available volume
//! that satisfies it (same storage class and volume mode, every access mode asked for,
//! capacity at least the request, the claim's selector), or to the volume it names or that
//! names it (pre-binding). The volume is written first (its claimRef, a compare-and-swap
//! on the volume, so two claims never get one volume), then the claim (volumeName), then
//! both statuses, as Kubernetes' PV controller does. A volume whose claim is deleted is
//! Released (Retain) or deleted (Delete); a claim whose volume is gone is Lost.
//! `plan` is pure; `run` is the loop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use corral_api::meta::JsonAt;
use corral_api::quantity::Quantity;
use serde_json::{Value, json};

use crate::cluster::{Cluster, ClusterError, text};
use crate::informer::Informers;

const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
const DEBOUNCE: Duration = Duration::from_millis(20);
const RESYNC: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// The volume's status phase.
    VolumePhase(Value),
    /// The volume with its claimRef (or without it, released back).
    Volume(Value),
    /// The claim with its volumeName.
    Claim(Value),
    /// The claim's status (phase, capacity, access modes).
    ClaimPhase(Value),
    /// Deletes a released volume whose reclaim policy is Delete.
    DeleteVolume(String),
}

fn storage(obj: &Value, pointer: &str) -> Option<Quantity> {
    obj.at(pointer).and_then(Quantity::from_json)
}

fn strings(obj: &Value, pointer: &str) -> HashSet<String> {
    corral_api::meta::string_list(obj.at(pointer)).into_iter().collect()
}

fn class(obj: &Value) -> &str {
    text(obj, "/spec/storageClassName")
}

fn volume_mode(obj: &Value) -> &str {
    match text(obj, "/spec/volumeMode") {
        "" => "Filesystem",
        m => m,
    }
}

/// Whether a volume can serve a claim (the volume's own binding aside).
pub fn satisfies(pv: &Value, pvc: &Value) -> bool {
    let modes_ok = strings(pvc, "/spec/accessModes").is_subset(&strings(pv, "/spec/accessModes"));
    let size_ok = match (storage(pv, "/spec/capacity/storage"), storage(pvc, "/spec/resources/requests/storage")) {
        (Some(have), Some(want)) => have >= want,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let selector_ok = match pvc.at("/spec/selector") {
        Some(s) if s.is_object() => corral_scheduler::plugins::parse_selector(Some(s)).is_some_and(|s| s.matches(pv)),
        _ => true,
    };
    modes_ok && size_ok && selector_ok && class(pv) == class(pvc) && volume_mode(pv) == volume_mode(pvc)
}

fn claim_key(pv: &Value) -> Option<(String, String)> {
    let r = pv.at("/spec/claimRef")?;
    Some((text(r, "/namespace").to_string(), text(r, "/name").to_string()))
}

fn annotate(obj: &mut Value, key: &str) {
    if !obj["metadata"]["annotations"].is_object() {
        obj["metadata"]["annotations"] = json!({});
    }
    obj["metadata"]["annotations"][key] = json!("yes");
}

fn with_phase(obj: &Value, phase: &str) -> Option<Value> {
    if text(obj, "/status/phase") == phase {
        return None;
    }
    let mut out = obj.clone();
    if !out["status"].is_object() {
        out["status"] = json!({});
    }
    out["status"]["phase"] = json!(phase);
    Some(out)
}

/// The claim's status once bound to `pv`.
fn bound_claim_status(pvc: &Value, pv: &Value) -> Option<Value> {
    let mut status = pvc.get("status").cloned().unwrap_or_else(|| json!({}));
    status["phase"] = json!("Bound");
    status["accessModes"] = pv.at("/spec/accessModes").cloned().unwrap_or(json!([]));
    status["capacity"] = pv.at("/spec/capacity").cloned().unwrap_or(json!({}));
    if pvc.get("status") == Some(&status) {
        return None;
    }
    let mut out = pvc.clone();
    out["status"] = status;
    Some(out)
}

/// One pass over every volume and claim.
pub fn plan(pvs: &[Arc<Value>], pvcs: &[Arc<Value>]) -> Vec<Action> {
    let mut actions = Vec::new();
    let claims: HashMap<(String, String), &Arc<Value>> = pvcs
        .iter()
        .map(|c| ((text(c, "/metadata/namespace").to_string(), text(c, "/metadata/name").to_string()), c))
        .collect();
    let volumes: HashMap<&str, &Arc<Value>> = pvs.iter().map(|v| (text(v, "/metadata/name"), v)).collect();
    // Volumes taken in this pass, so no two claims get one.
    let mut taken: HashSet<String> = HashSet::new();

    for pv in pvs {
        let name = text(pv, "/metadata/name");
        let Some(key) = claim_key(pv) else {
            actions.extend(with_phase(pv, "Available").map(Action::VolumePhase));
            continue;
        };
        taken.insert(name.to_string());
        let want_uid = text(pv, "/spec/claimRef/uid");
        match claims.get(&key) {
            Some(pvc) if want_uid.is_empty() || want_uid == text(pvc, "/metadata/uid") => {
                let volume_name = text(pvc, "/spec/volumeName");
                if volume_name == name {
                    actions.extend(with_phase(pv, "Bound").map(Action::VolumePhase));
                } else if !volume_name.is_empty() {
                    // The claim went to another volume: a binding this controller made is undone.
                    let ours = pv.at("/metadata/annotations").and_then(|a| a.get(BOUND_BY_CONTROLLER));
                    if ours.is_some() {
                        let mut freed = (**pv).clone();
                        freed["spec"].as_object_mut().map(|s| s.remove("claimRef"));
                        actions.push(Action::Volume(freed));
                    }
                }
                // A claim with no volume yet is bound from the claim's side below.
            }
            None if want_uid.is_empty() => {
                // Pre-bound to a claim that does not exist yet.
                actions.extend(with_phase(pv, "Available").map(Action::VolumePhase));
            }
            _ => {
                // Its claim was deleted.
                match text(pv, "/spec/persistentVolumeReclaimPolicy") {
                    "Delete" => actions.push(Action::DeleteVolume(name.to_string())),
                    _ => actions.extend(with_phase(pv, "Released").map(Action::VolumePhase)),
                }
            }
        }
    }

    let mut pending: Vec<&Arc<Value>> = pvcs.iter().filter(|c| c.at("/metadata/deletionTimestamp").is_none()).collect();
    pending.sort_by_key(|c| text(c, "/metadata/creationTimestamp").to_string());
    for pvc in pending {
        let (ns, claim) = (text(pvc, "/metadata/namespace"), text(pvc, "/metadata/name"));
        let uid = text(pvc, "/metadata/uid");
        let refers_here = |pv: &Value| {
            let ref_uid = text(pv, "/spec/claimRef/uid");
            claim_key(pv) == Some((ns.to_string(), claim.to_string())) && (ref_uid.is_empty() || ref_uid == uid)
        };
        let volume_name = text(pvc, "/spec/volumeName");
        if !volume_name.is_empty() {
            match volumes.get(volume_name) {
                None => actions.extend(with_phase(pvc, "Lost").map(Action::ClaimPhase)),
                Some(pv) if refers_here(pv) && !text(pv, "/spec/claimRef/uid").is_empty() => {
                    actions.extend(bound_claim_status(pvc, pv).map(Action::ClaimPhase));
                }
                Some(pv) if pv.at("/spec/claimRef").is_none() || refers_here(pv) => {
                    // The claim names the volume: the volume is bound to it.
                    actions.push(Action::Volume(bind_volume(pv, pvc)));
                    taken.insert(volume_name.to_string());
                }
                Some(_) => {}
            }
            continue;
        }
        // A volume that names this claim first, then the smallest that fits.
        let prebound = pvs.iter().find(|pv| refers_here(pv) && satisfies(pv, pvc));
        let chosen = prebound.or_else(|| {
            pvs.iter()
                .filter(|pv| pv.at("/spec/claimRef").is_none() && !taken.contains(text(pv, "/metadata/name")))
                .filter(|pv| pv.at("/metadata/deletionTimestamp").is_none() && satisfies(pv, pvc))
                .min_by_key(|pv| (storage(pv, "/spec/capacity/storage"), text(pv, "/metadata/name").to_string()))
        });
        let Some(pv) = chosen else {
            actions.extend(with_phase(pvc, "Pending").map(Action::ClaimPhase));
            continue;
        };
        taken.insert(text(pv, "/metadata/name").to_string());
        if text(pv, "/spec/claimRef/uid") != uid {
            actions.push(Action::Volume(bind_volume(pv, pvc)));
        }
        let mut bound = (**pvc).clone();
        bound["spec"]["volumeName"] = json!(text(pv, "/metadata/name"));
        annotate(&mut bound, BIND_COMPLETED);
        annotate(&mut bound, BOUND_BY_CONTROLLER);
        actions.push(Action::Claim(bound));
    }
    actions
}

fn bind_volume(pv: &Value, pvc: &Value) -> Value {
    let mut bound = pv.clone();
    bound["spec"]["claimRef"] = json!({
        "kind": "PersistentVolumeClaim", "apiVersion": "v1",
        "namespace": text(pvc, "/metadata/namespace"), "name": text(pvc, "/metadata/name"),
        "uid": text(pvc, "/metadata/uid"), "resourceVersion": text(pvc, "/metadata/resourceVersion"),
    });
    if pv.at("/spec/claimRef").is_none() {
        annotate(&mut bound, BOUND_BY_CONTROLLER);
    }
    bound
}

/// Runs the binder until aborted.
pub async fn run<C: Cluster>(cluster: Arc<C>, informers: Arc<Informers>) {
    let pvs = informers.get("persistentvolumes").await;
    let pvcs = informers.get("persistentvolumeclaims").await;
    loop {
        let pass = std::time::Instant::now();
        let changes = (pvs.changed(), pvcs.changed());
        for action in plan(&pvs.list(), &pvcs.list()) {
            let result = match action {
                Action::VolumePhase(pv) => cluster.update_status("persistentvolumes", pv).await.map(|_| ()),
                Action::Volume(pv) => cluster.update("persistentvolumes", pv).await.map(|_| ()),
                Action::Claim(pvc) => cluster.update("persistentvolumeclaims", pvc).await.map(|_| ()),
                Action::ClaimPhase(pvc) => cluster.update_status("persistentvolumeclaims", pvc).await.map(|_| ()),
                Action::DeleteVolume(name) => cluster.delete("persistentvolumes", "", &name, json!({})).await,
            };
            match result {
                Ok(()) => {}
                // Someone else moved first: the next pass reads again (a claim whose volume
                // write conflicted is not written either: the pass stops here).
                Err(ClusterError::Conflict(_)) | Err(ClusterError::NotFound(_)) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "volume binding write failed");
                    break;
                }
            }
        }
        let worked = pass.elapsed();
        tokio::select! {
            _ = changes.0 => {}
            _ = changes.1 => {}
            _ = tokio::time::sleep(RESYNC) => {}
        }
        crate::informer::pace(worked, DEBOUNCE, 0.1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(name: &str, size: &str, modes: &[&str]) -> Value {
        json!({"metadata": {"name": name}, "spec": {"capacity": {"storage": size}, "accessModes": modes,
                                                     "hostPath": {"path": "/data/demo"},
                                                     "persistentVolumeReclaimPolicy": "Retain"},
               "status": {"phase": "Pending"}})
    }

    fn pvc(name: &str, size: &str, modes: &[&str]) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "uid": format!("u-{name}"), "resourceVersion": "5",
                            "creationTimestamp": "2024-01-01T00:00:00Z"},
               "spec": {"accessModes": modes, "resources": {"requests": {"storage": size}}},
               "status": {"phase": "Pending"}})
    }

    /// Applies a pass's writes to the objects, as the API would.
    fn apply(pvs: &mut Vec<Arc<Value>>, pvcs: &mut [Arc<Value>], actions: &[Action]) {
        for a in actions {
            match a {
                Action::VolumePhase(v) | Action::Volume(v) => {
                    let i = pvs.iter().position(|p| p["metadata"]["name"] == v["metadata"]["name"]).unwrap();
                    pvs[i] = Arc::new(v.clone());
                }
                Action::Claim(c) | Action::ClaimPhase(c) => {
                    let i = pvcs.iter().position(|p| p["metadata"]["name"] == c["metadata"]["name"]).unwrap();
                    pvcs[i] = Arc::new(c.clone());
                }
                Action::DeleteVolume(n) => pvs.retain(|p| p["metadata"]["name"] != n.as_str()),
            }
        }
    }

    fn settle(pvs: &mut Vec<Arc<Value>>, pvcs: &mut [Arc<Value>]) {
        for _ in 0..10 {
            let actions = plan(pvs, pvcs);
            if actions.is_empty() {
                return;
            }
            apply(pvs, pvcs, &actions);
        }
        panic!("no steady state");
    }

    #[test]
    fn the_seed_claim_binds_to_the_seed_volume() {
        let mut pvs = vec![Arc::new(pv("pv-demo", "50Mi", &["ReadWriteOnce"]))];
        let mut pvcs = vec![Arc::new(pvc("pvc-demo", "50Mi", &["ReadWriteOnce"]))];
        settle(&mut pvs, &mut pvcs);
        assert_eq!(pvs[0]["spec"]["claimRef"]["name"], "pvc-demo");
        assert_eq!(pvs[0]["spec"]["claimRef"]["uid"], "u-pvc-demo");
        assert_eq!(pvs[0]["status"]["phase"], "Bound");
        assert_eq!(pvcs[0]["spec"]["volumeName"], "pv-demo");
        assert_eq!(pvcs[0]["status"]["phase"], "Bound");
        assert_eq!(pvcs[0]["status"]["capacity"]["storage"], "50Mi");
        assert_eq!(pvcs[0]["metadata"]["annotations"][BIND_COMPLETED], "yes");
    }

    #[test]
    fn the_smallest_fitting_volume_is_chosen_and_never_given_twice() {
        let mut pvs = vec![
            Arc::new(pv("big", "10Gi", &["ReadWriteOnce"])),
            Arc::new(pv("small", "1Gi", &["ReadWriteOnce", "ReadOnlyMany"])),
            Arc::new(pv("tiny", "100Mi", &["ReadWriteOnce"])),
            Arc::new(pv("wrong-mode", "1Gi", &["ReadOnlyMany"])),
        ];
        let mut pvcs =
            vec![Arc::new(pvc("a", "500Mi", &["ReadWriteOnce"])), Arc::new(pvc("b", "500Mi", &["ReadWriteOnce"]))];
        settle(&mut pvs, &mut pvcs);
        assert_eq!(pvcs[0]["spec"]["volumeName"], "small");
        assert_eq!(pvcs[1]["spec"]["volumeName"], "big");
        let mut third = vec![Arc::new(pvc("c", "500Mi", &["ReadWriteOnce"]))];
        let actions = plan(&pvs, &third);
        assert!(!actions.iter().any(|a| matches!(a, Action::Claim(_))), "nothing left for c: {actions:?}");
        apply(&mut pvs, &mut third, &actions);
        assert_eq!(third[0]["status"]["phase"], "Pending");
    }

    #[test]
    fn storage_class_and_selector_must_match() {
        let mut fast = pv("fast", "1Gi", &["ReadWriteOnce"]);
        fast["spec"]["storageClassName"] = json!("fast");
        fast["metadata"]["labels"] = json!({"disk": "ssd"});
        let plain = pv("plain", "1Gi", &["ReadWriteOnce"]);
        let mut claim = pvc("x", "1Gi", &["ReadWriteOnce"]);
        assert!(satisfies(&plain, &claim) && !satisfies(&fast, &claim));
        claim["spec"]["storageClassName"] = json!("fast");
        claim["spec"]["selector"] = json!({"matchLabels": {"disk": "hdd"}});
        assert!(!satisfies(&fast, &claim));
        claim["spec"]["selector"] = json!({"matchLabels": {"disk": "ssd"}});
        assert!(satisfies(&fast, &claim));
    }

    #[test]
    fn a_deleted_claim_releases_or_deletes_its_volume() {
        let mut pvs = vec![Arc::new(pv("kept", "1Gi", &["ReadWriteOnce"])), {
            let mut v = pv("gone", "1Gi", &["ReadWriteOnce"]);
            v["spec"]["persistentVolumeReclaimPolicy"] = json!("Delete");
            v["spec"]["storageClassName"] = json!("scratch");
            Arc::new(v)
        }];
        let mut scratch = pvc("s", "1Gi", &["ReadWriteOnce"]);
        scratch["spec"]["storageClassName"] = json!("scratch");
        let mut pvcs = vec![Arc::new(pvc("k", "1Gi", &["ReadWriteOnce"])), Arc::new(scratch)];
        settle(&mut pvs, &mut pvcs);
        assert_eq!(pvs.iter().filter(|v| v["status"]["phase"] == "Bound").count(), 2);
        pvcs.clear();
        settle(&mut pvs, &mut pvcs);
        assert_eq!(pvs.len(), 1, "the Delete volume went");
        assert_eq!(pvs[0]["status"]["phase"], "Released");
        // A new claim does not get a Released volume.
        let mut again = vec![Arc::new(pvc("k2", "1Gi", &["ReadWriteOnce"]))];
        settle(&mut pvs, &mut again);
        assert_eq!(again[0]["status"]["phase"], "Pending");
    }

    #[test]
    fn a_claim_naming_its_volume_gets_it() {
        let mut pvs = vec![Arc::new(pv("named", "1Gi", &["ReadWriteOnce"]))];
        let mut claim = pvc("n", "1Gi", &["ReadWriteOnce"]);
        claim["spec"]["volumeName"] = json!("named");
        let mut pvcs = vec![Arc::new(claim)];
        settle(&mut pvs, &mut pvcs);
        assert_eq!(pvs[0]["spec"]["claimRef"]["uid"], "u-n");
        assert_eq!(pvcs[0]["status"]["phase"], "Bound");
    }
}
