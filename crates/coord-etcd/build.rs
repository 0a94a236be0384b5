//! Nothing is generated here. The build-dependency on `protoc-bin-vendored` makes cargo fetch
//! the vendored protoc that `tools/protoc` hands to etcd-client's build script (see
//! `.cargo/config.toml`), so that no system protoc is needed.

fn main() {
    // Fails the build early, with a clear message, if the vendored binary is missing.
    if let Err(error) = protoc_bin_vendored::protoc_bin_path() {
        println!("cargo:warning=no vendored protoc: {error}");
    }
}
