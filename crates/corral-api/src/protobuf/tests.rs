//! Bodies captured from kubectl 1.32 (`kubectl -v=9 create ...`), decoded.

use serde_json::{Value, json};

use super::{decode, schema};

fn fixture(hex: &str) -> Vec<u8> {
    let hex = hex.trim();
    (0..hex.len() / 2).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")).collect()
}

fn decoded(hex: &str) -> Value {
    decode(&fixture(hex)).expect("kubectl's body decodes")
}

#[test]
fn the_schema_parses_and_every_reference_resolves() {
    let messages = schema::parse(include_str!("schema.txt")).expect("schema.txt is well formed");
    for kind in ["ConfigMap", "Secret", "Namespace", "Deployment", "Service", "ServiceAccount", "Eviction", "Pod"] {
        assert!(messages.contains_key(kind), "{kind} is described");
    }
    assert!(schema::parse("message A\n  1 b B\n").is_err(), "a dangling reference is refused");
    assert!(schema::parse("message A\n  1 b string\n  1 c string\n").is_err(), "a reused number is refused");
}

#[test]
fn create_deployment_keeps_the_template_and_an_explicit_zero() {
    let d = decoded(include_str!("fixtures/deployment.hex"));
    assert_eq!(d["apiVersion"], "apps/v1");
    assert_eq!(d["kind"], "Deployment");
    assert_eq!(
        d["metadata"],
        json!({ "name": "web", "labels": { "app": "web" } }),
        "empty strings and times are absent"
    );
    assert_eq!(d["spec"]["replicas"], 3);
    assert_eq!(d["spec"]["selector"], json!({ "matchLabels": { "app": "web" } }));
    let container = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["name"], "nginx");
    assert_eq!(container["image"], "nginx:1.25");
    assert_eq!(container["ports"], json!([{ "containerPort": 80 }]));

    let idle = decoded(include_str!("fixtures/deployment-zero.hex"));
    assert_eq!(idle["spec"]["replicas"], 0, "replicas is a pointer: zero was asked for");
    assert_eq!(idle["spec"]["template"]["spec"]["containers"][0]["command"], json!(["sleep", "3600"]));
}

#[test]
fn secrets_configmaps_and_the_small_kinds() {
    let s = decoded(include_str!("fixtures/secret.hex"));
    assert_eq!(s["kind"], "Secret");
    assert_eq!(s["data"], json!({ "user": "YWRtaW4=", "pass": "czNjcj10" }), "bytes are base64 as in JSON");

    let cm = decoded(include_str!("fixtures/configmap.hex"));
    assert_eq!(cm["data"], json!({ "mode": "fast", "level": "3" }));

    let ns = decoded(include_str!("fixtures/namespace.hex"));
    assert_eq!((ns["kind"].as_str(), ns["metadata"]["name"].as_str()), (Some("Namespace"), Some("team-a")));

    let svc = decoded(include_str!("fixtures/service.hex"));
    assert_eq!(svc["spec"]["type"], "NodePort");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080, "IntOrString as a number");
    assert_eq!(svc["spec"]["selector"], json!({ "app": "web" }));

    let sa = decoded(include_str!("fixtures/serviceaccount.hex"));
    assert_eq!(sa["metadata"]["name"], "robot");
}

#[test]
fn what_cannot_be_decoded_is_refused_not_dropped() {
    assert!(decode(b"{\"kind\":\"Pod\"}").is_err(), "JSON is not protobuf");
    let mut body = fixture(include_str!("fixtures/configmap.hex"));
    body.truncate(body.len() - 3);
    assert!(decode(&body).is_err(), "a truncated body");
    // A ConfigMap with an unknown field 15 (varint 1) appended to the object.
    let unknown =
        [&b"k8s\0"[..], &[0x0a, 0x0f, 0x0a, 0x02, b'v', b'1', 0x12, 0x09], b"ConfigMap", &[0x12, 0x02, 0x78, 0x01]]
            .concat();
    let err = decode(&unknown).expect_err("an unknown field is refused").to_string();
    assert!(err.contains("field 15 of ConfigMap"), "{err}");
}
