// mimalloc, not the C library's allocator: with glibc's per-thread arenas, the watchers' threads
// deserialize the cluster and the enforcer's thread frees it, and the agent kept ~45% more
// resident than it holds (docs/agent.md, "Memory"); musl's allocator (the image) is compact
// but slow on the compiler's many small allocations.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    npc_agent::cli::main()
}
