//! The `keel` binary.

/// mimalloc: a step allocates many short-lived buffers (JSON, HTTP, SQL
/// arguments) on several threads; glibc malloc spent ~15% of the benchmark's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keel::cli::main()
}
