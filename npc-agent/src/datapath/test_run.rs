//! BPF_PROG_TEST_RUN: a program run on a crafted packet, on loopback or on a given interface
//! (packet tests and the in-kernel benchmark).
use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use super::{Datapath, DatapathError, Hook};

impl Datapath {
    /// Runs a program once on a crafted packet (BPF_PROG_TEST_RUN) and returns its verdict.
    /// In a test run the packet "arrives" on the loopback device, ifindex 1.
    pub fn test_run(&self, hook: Hook, packet: &[u8]) -> Result<i32, DatapathError> {
        Ok(self.run(hook, packet, None, 1)?.0)
    }

    /// [`Self::test_run`] with the packet arriving on interface `ifindex` (the `__sk_buff`
    /// context's `ifindex`), so that the program finds the endpoint behind that interface. The
    /// kernel looks the device up in the calling thread's network namespace: it must exist there.
    pub fn test_run_on(&self, hook: Hook, packet: &[u8], ifindex: u32) -> Result<i32, DatapathError> {
        // struct __sk_buff up to and including `ifindex`, its eleventh u32; the rest stays zero.
        let mut ctx = [0u8; 44];
        ctx[40..].copy_from_slice(&ifindex.to_ne_bytes());
        Ok(self.run(hook, packet, Some(&ctx), 1)?.0)
    }

    /// Runs a program `repeat` times on one packet and returns the mean time per run (benchmarks).
    pub fn bench_run(&self, hook: Hook, packet: &[u8], repeat: u32) -> Result<Duration, DatapathError> {
        Ok(self.run(hook, packet, None, repeat)?.1)
    }

    /// [`Self::bench_run`] for the empty program (loaded on first use): the floor of every
    /// per-packet figure, the kernel's cost of a test run around any program.
    pub fn bench_floor(&mut self, packet: &[u8], repeat: u32) -> Result<Duration, DatapathError> {
        let name = npc_common::program_names::FLOOR;
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let result = prog.test_run(TestRunOptions {
            data_in: Some(packet),
            repeat,
            ..Default::default()
        })?;
        Ok(result.duration)
    }

    /// (the last run's verdict, the mean time per run).
    fn run(
        &self,
        hook: Hook,
        packet: &[u8],
        ctx: Option<&[u8]>,
        repeat: u32,
    ) -> Result<(i32, Duration), DatapathError> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(hook.program())
            .ok_or(DatapathError::MissingProgram(hook.program()))?
            .try_into()?;
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: ctx,
            repeat,
            ..Default::default()
        };
        let result = prog.test_run(opts)?;
        Ok((result.return_value as i32, result.duration))
    }
}
