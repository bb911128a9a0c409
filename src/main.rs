//! The `ferry` binary: everything lives in the library; see `ferry --help`.

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
