//! The four programs by name, and running one on a crafted frame with
//! `BPF_PROG_TEST_RUN` (unit tests of the datapath).

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use super::{BpfError, Datapath};

/// In a test run the skb's device is the loopback of the caller's namespace, so
/// `veth_ingress` sees this ifindex (seed VETH_SLOTS with it).
pub const TEST_RUN_IFINDEX: u32 = 1;

/// Room the output buffer leaves beyond the input frame.
const OUTPUT_HEADROOM: usize = 256;

/// One of the datapath's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `tap_ingress` (tap0, slot namespace).
    TapIngress,
    /// `veth_ingress` (host veth, agent namespace).
    VethIngress,
    /// `uplink_ingress` (uplink, agent namespace).
    UplinkIngress,
    /// `slot_ingress` (eth0, slot namespace).
    SlotIngress,
}

impl Program {
    /// Every program.
    pub const ALL: [Program; 4] = [
        Program::TapIngress,
        Program::VethIngress,
        Program::UplinkIngress,
        Program::SlotIngress,
    ];

    /// The program's name in the object.
    pub const fn name(self) -> &'static str {
        match self {
            Program::TapIngress => "tap_ingress",
            Program::VethIngress => "veth_ingress",
            Program::UplinkIngress => "uplink_ingress",
            Program::SlotIngress => "slot_ingress",
        }
    }
}

/// The result of one test run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: i32,
    /// The frame after the program ran.
    pub frame: Vec<u8>,
    /// `skb->mark` after the program ran (`TO_GUEST_MARK` hands a reply from
    /// `uplink_ingress` to `slot_ingress`).
    pub mark: u32,
}

impl Datapath {
    /// Runs `prog` once on `frame` (an Ethernet frame) with BPF_PROG_TEST_RUN and
    /// returns its verdict and the frame as the program left it. Its ifindex is
    /// `TEST_RUN_IFINDEX`.
    pub fn test_run(&self, prog: Program, frame: &[u8]) -> Result<TestRunOutput, BpfError> {
        self.test_run_repeat(prog, frame, 1).map(|(out, _)| out)
    }

    /// Runs `prog` on `frame` `repeat` times in the kernel and returns the output
    /// and the mean time of one run.
    ///
    /// Caveat for cost measurements: the kernel reruns the program on the *same*
    /// skb, which the first run already rewrote (a translated packet then takes
    /// the pass-through path). To time the translating path, call this with
    /// `repeat = 1` many times and average the durations (as the datapath test
    /// `program_cost_per_packet` does).
    pub fn test_run_repeat(
        &self,
        prog: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(TestRunOutput, Duration), BpfError> {
        run(&self.ebpf, prog, frame, SkbCtx::default(), repeat)
    }

    /// Runs `prog` once on `frame` carrying `skb->mark` `mark`, as a packet
    /// another program marked (`TestRunOutput::mark`) arrives.
    pub fn test_run_marked(
        &self,
        prog: Program,
        frame: &[u8],
        mark: u32,
    ) -> Result<TestRunOutput, BpfError> {
        let ctx = SkbCtx {
            mark,
            ..SkbCtx::default()
        };
        run(&self.ebpf, prog, frame, ctx, 1).map(|(out, _)| out)
    }

    /// Runs `prog` once on `frame` as if it arrived on device `ifindex` of the
    /// calling thread's namespace (`ENODEV` if there is none): for programs
    /// that find their slot from the ifindex, like `tap_ingress`. Run it inside
    /// a throwaway namespace that holds such a device (`in_netns`).
    pub fn test_run_on(
        &self,
        prog: Program,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<TestRunOutput, BpfError> {
        self.test_run_on_repeat(prog, frame, ifindex, 1)
            .map(|(out, _)| out)
    }

    /// The same `repeat` times (on the same skb: see `test_run_repeat`'s
    /// caveat); also returns the mean kernel time of one run.
    pub fn test_run_on_repeat(
        &self,
        prog: Program,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(TestRunOutput, Duration), BpfError> {
        let ctx = SkbCtx {
            ifindex,
            ..SkbCtx::default()
        };
        run(&self.ebpf, prog, frame, ctx, repeat)
    }
}

/// Offset of `mark` in `struct __sk_buff`.
const SKB_MARK_OFF: usize = 8;
/// Offset of `ifindex` in `struct __sk_buff`.
const SKB_IFINDEX_OFF: usize = 40;
/// `struct __sk_buff` up to and including `ifindex`: the kernel zero-fills
/// the rest of the context.
const SKB_CTX_LEN: usize = SKB_IFINDEX_OFF + 4;

/// Room for the whole `struct __sk_buff` the kernel writes back (it refuses a
/// shorter buffer; 192 bytes in 6.x).
const SKB_CTX_OUT_LEN: usize = 256;

/// The `__sk_buff` fields a test run sets (the kernel takes these from the
/// context it is given).
#[derive(Debug, Clone, Copy, Default)]
struct SkbCtx {
    /// `skb->mark`.
    mark: u32,
    /// The device the skb arrives on, in the caller's namespace; 0 for the
    /// loopback (`TEST_RUN_IFINDEX`).
    ifindex: u32,
}

impl SkbCtx {
    fn bytes(self) -> [u8; SKB_CTX_LEN] {
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_MARK_OFF..SKB_MARK_OFF + 4].copy_from_slice(&self.mark.to_ne_bytes());
        ctx[SKB_IFINDEX_OFF..].copy_from_slice(&self.ifindex.to_ne_bytes());
        ctx
    }
}

/// One BPF_PROG_TEST_RUN of `prog` on `frame` with the `__sk_buff` context
/// `ctx`.
fn run(
    ebpf: &aya::Ebpf,
    prog: Program,
    frame: &[u8],
    ctx: SkbCtx,
    repeat: u32,
) -> Result<(TestRunOutput, Duration), BpfError> {
    let name = prog.name();
    let p: &SchedClassifier = ebpf
        .program(name)
        .ok_or(BpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e| BpfError::program(name, "type check", e))?;
    let mut out = vec![0u8; frame.len() + OUTPUT_HEADROOM];
    let ctx_in = ctx.bytes();
    let mut ctx_out = [0u8; SKB_CTX_OUT_LEN];
    let result = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        })
        .map_err(|e| BpfError::program(name, "BPF_PROG_TEST_RUN", e))?;
    out.truncate(result.data_size_out as usize);
    let mark = u32::from_ne_bytes(
        ctx_out[SKB_MARK_OFF..SKB_MARK_OFF + 4]
            .try_into()
            .expect("four bytes"),
    );
    Ok((
        TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            mark,
        },
        result.duration,
    ))
}
