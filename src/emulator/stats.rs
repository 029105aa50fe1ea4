//! Call counters reported at `GET /__emulator/stats`: all relaxed atomics, so
//! counting costs a few nanoseconds per call and never contends on a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{json, Map, Value};

use super::protocol::Command;
use super::world::World;

/// Codes the emulator can answer, each with its own counter; others count as "other".
const CODES: &[i64] = &[
    0, 10004, 10005, 10007, 10010, 10014, 10015, 10019, 10021, 30001, 30003, 30004, 40001, 40002,
    40003, 40004, 40009, 50001, 50002, 50004, 50005, 51008, 60002, 60003, 60006, 60007, 60008,
    60009, 60010, 60012, 70001, 70003, 70009, 70013, 70014, 70107, 70398, 70402, 90001, 90003,
    90011,
];

/// A kind of injected fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FaultKind {
    /// Answered 50004.
    Fail50004,
    /// Answered 50005.
    Fail50005,
    /// Connection closed without an answer.
    Drop,
    /// Delayed by latency/jitter.
    Delay,
}

/// All counters.
pub(crate) struct Stats {
    started: Instant,
    total: AtomicU64,
    /// One per [`Command::ALL`], then one for unknown commands.
    per_command: Vec<AtomicU64>,
    /// One per account, by index.
    per_account: Vec<AtomicU64>,
    faults: [AtomicU64; 4],
    codes: Vec<AtomicU64>,
    other_codes: AtomicU64,
    webhooks_sent: AtomicU64,
    webhooks_failed: AtomicU64,
}

fn zeros(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Stats {
    /// Counters for a world of `accounts` accounts.
    pub(crate) fn new(accounts: u32) -> Stats {
        Stats {
            started: Instant::now(),
            total: AtomicU64::new(0),
            per_command: zeros(Command::ALL.len() + 1),
            per_account: zeros(accounts as usize),
            faults: [
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
                AtomicU64::new(0),
            ],
            codes: zeros(CODES.len()),
            other_codes: AtomicU64::new(0),
            webhooks_sent: AtomicU64::new(0),
            webhooks_failed: AtomicU64::new(0),
        }
    }

    /// A call arrived for `command` (`None`: unknown command or path).
    pub(crate) fn call(&self, command: Option<Command>) {
        bump(&self.total);
        let i = command.map_or(Command::ALL.len(), Command::index);
        if let Some(c) = self.per_command.get(i) {
            bump(c);
        }
    }

    /// A call named `From_Account` (or the sender) at this index.
    pub(crate) fn account(&self, index: u32) {
        if let Some(c) = self.per_account.get(index as usize) {
            bump(c);
        }
    }

    /// A fault was injected.
    pub(crate) fn fault(&self, kind: FaultKind) {
        bump(&self.faults[kind as usize]);
    }

    /// A call was answered with `code`.
    pub(crate) fn answered(&self, code: i64) {
        match CODES.iter().position(|&c| c == code) {
            Some(i) => bump(&self.codes[i]),
            None => bump(&self.other_codes),
        }
    }

    /// A webhook was delivered (any HTTP answer) or failed.
    pub(crate) fn webhook(&self, delivered: bool) {
        bump(if delivered {
            &self.webhooks_sent
        } else {
            &self.webhooks_failed
        });
    }

    /// Zeroes every counter.
    pub(crate) fn reset(&self) {
        let all = std::iter::once(&self.total)
            .chain(&self.per_command)
            .chain(&self.per_account)
            .chain(&self.faults)
            .chain(&self.codes)
            .chain([
                &self.other_codes,
                &self.webhooks_sent,
                &self.webhooks_failed,
            ]);
        for c in all {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The report: every non-zero per-command, per-account and per-code counter.
    pub(crate) fn report(&self, world: &World) -> Value {
        let mut commands = Map::new();
        for c in Command::ALL {
            let n = get(&self.per_command[c.index()]);
            if n > 0 {
                commands.insert(c.as_str().into(), n.into());
            }
        }
        let unknown = get(&self.per_command[Command::ALL.len()]);
        if unknown > 0 {
            commands.insert("(unknown)".into(), unknown.into());
        }
        let mut accounts = Map::new();
        for (i, c) in self.per_account.iter().enumerate() {
            let n = get(c);
            if n > 0 {
                accounts.insert(world.name(i as u32).into(), n.into());
            }
        }
        let mut codes = Map::new();
        for (code, c) in CODES.iter().zip(&self.codes) {
            let n = get(c);
            if n > 0 {
                codes.insert(code.to_string(), n.into());
            }
        }
        let other = get(&self.other_codes);
        if other > 0 {
            codes.insert("other".into(), other.into());
        }
        let rate_limited = CODES
            .iter()
            .position(|&c| c == 60007)
            .map_or(0, |i| get(&self.codes[i]));
        json!({
            "total_calls": get(&self.total),
            "calls_per_command": commands,
            "calls_per_account": accounts,
            "faults_injected": {
                "50004": get(&self.faults[FaultKind::Fail50004 as usize]),
                "50005": get(&self.faults[FaultKind::Fail50005 as usize]),
                "drop": get(&self.faults[FaultKind::Drop as usize]),
                "latency": get(&self.faults[FaultKind::Delay as usize]),
            },
            "rate_limited_60007": rate_limited,
            "answers_per_code": codes,
            "webhooks": {
                "delivered": get(&self.webhooks_sent),
                "failed": get(&self.webhooks_failed),
            },
            "uptime_secs": self.started.elapsed().as_secs(),
        })
    }
}
