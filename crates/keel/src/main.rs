//! The `keel` binary.

/// mimalloc: a step allocates many short-lived buffers (JSON, HTTP, SQL
/// arguments) on several threads; glibc malloc spent ~15% of the benchmark's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // rustls picks its crypto provider from crate features; name it once, so
    // a dependency that brings another provider can never make TLS set-up
    // (async-nats builds its config from the process default) panic.
    #[cfg(feature = "nats")]
    let _ = async_nats::rustls::crypto::aws_lc_rs::default_provider().install_default();
    keel::cli::main()
}
