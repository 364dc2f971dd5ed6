fn main() -> std::process::ExitCode {
    npc_agent::cli::main()
}
