//! The `keel` binary.

fn main() -> std::process::ExitCode {
    keel::cli::main()
}
