//! Compiles proto/ with protox (pure Rust, no protoc on the machine).

fn main() {
    // The manifest directory of this build, read when the script runs: `env!` would bake in
    // the path of whichever clone first compiled the script, and a target directory shared
    // between clones would then compile that clone's protos.
    let manifest = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let root = std::path::Path::new(&manifest).join("../../proto");
    let includes = [root.join("etcd"), root.join("corral"), root.join("cri")];
    let files = [
        root.join("etcd/kv.proto"),
        root.join("etcd/auth.proto"),
        root.join("etcd/rpc.proto"),
        root.join("corral/store.proto"),
        root.join("corral/agent.proto"),
        root.join("cri/runtime.proto"),
    ];
    // Relative to this crate, so that a target directory shared by clones at other paths
    // (CI keeps one) still sees edits here.
    println!("cargo:rerun-if-changed=../../proto");
    let fds = protox::compile(&files, &includes).expect("proto/ does not compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("code generation from proto/ failed");
}
