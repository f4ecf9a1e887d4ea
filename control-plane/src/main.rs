fn main() -> std::process::ExitCode {
    remora_control_plane::cli::main()
}
