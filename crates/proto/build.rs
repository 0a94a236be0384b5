//! Compiles `proto/imstate.proto`. Uses the system `protoc` when `PROTOC` is set, otherwise the
//! one vendored by `protoc-bin-vendored`, so a fresh machine builds without installing anything.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let proto_dir = "../../proto";
    println!("cargo:rerun-if-changed={proto_dir}");
    tonic_prost_build::configure().compile_protos(
        &[format!("{proto_dir}/imstate.proto")],
        &[proto_dir.to_string()],
    )?;
    Ok(())
}
