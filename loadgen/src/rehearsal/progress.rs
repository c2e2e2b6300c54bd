//! Live progress: a status line redrawn in place on a terminal (indicatif), plain periodic lines
//! otherwise (CI logs, pipes); and the process's own CPU and memory, read from `/proc`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::rehearsal::measure::{Count, Measurements, Series};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Progress {
    /// A live line on a terminal, plain lines otherwise.
    Auto,
    /// Always the live line.
    Bar,
    /// Always plain lines, every few seconds.
    Lines,
    Off,
}

/// A running display.
#[derive(Debug)]
pub enum Display {
    Bar(indicatif::ProgressBar),
    Lines { every: usize },
    Off,
}

impl Progress {
    pub fn start(self, scheduled: u64) -> Display {
        let bar = match self {
            Progress::Bar => true,
            Progress::Auto => std::io::stderr().is_terminal(),
            Progress::Lines => false,
            Progress::Off => return Display::Off,
        };
        if bar {
            let bar = indicatif::ProgressBar::new(scheduled);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} users  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            Display::Bar(bar)
        } else {
            Display::Lines { every: 5 }
        }
    }
}

impl Display {
    /// Shows the state at the end of second `second`.
    pub fn update(&mut self, measurements: &Measurements, second: usize, cpu: f64, rss: u64) {
        let line = || {
            format!(
                "{} req/s, {} in flight, {} verified, {} expired, p99 start {:.1} ms, p99 time to SMS {:.1} s, cpu {:.0}%, rss {} MiB",
                measurements.requests_in(second),
                measurements.in_flight(),
                measurements.get(Count::Verified),
                measurements.get(Count::ExpiredSessions),
                measurements.percentile(Series::Start, 0.99) as f64 / 1000.0,
                measurements.percentile(Series::TimeToSms, 0.99) as f64 / 1_000_000.0,
                cpu * 100.0,
                rss / 1_048_576,
            )
        };
        match self {
            Display::Bar(bar) => {
                bar.set_position(measurements.get(Count::Arrived));
                bar.set_message(line());
            }
            Display::Lines { every } => {
                if (second + 1) % *every == 0 {
                    eprintln!(
                        "[{:>5}s] {} arrived, {}",
                        second + 1,
                        measurements.get(Count::Arrived),
                        line()
                    );
                }
            }
            Display::Off => {}
        }
    }

    pub fn finish(self) {
        if let Display::Bar(bar) = self {
            bar.finish();
        }
    }
}

/// The process's CPU use between readings, as a share of one core.
#[derive(Debug)]
pub struct CpuMeter {
    last_ticks: Option<u64>,
    last_at: Instant,
}

impl CpuMeter {
    pub fn new() -> CpuMeter {
        CpuMeter {
            last_ticks: cpu_ticks(),
            last_at: Instant::now(),
        }
    }

    pub fn share_since_last(&mut self) -> f64 {
        let now = Instant::now();
        let ticks = cpu_ticks();
        let share = match (self.last_ticks, ticks) {
            (Some(before), Some(after)) => {
                let seconds = after.saturating_sub(before) as f64 / ticks_per_second();
                seconds
                    / now
                        .duration_since(self.last_at)
                        .max(Duration::from_millis(1))
                        .as_secs_f64()
            }
            _ => 0.0,
        };
        self.last_ticks = ticks;
        self.last_at = now;
        share
    }
}

impl Default for CpuMeter {
    fn default() -> Self {
        CpuMeter::new()
    }
}

/// User plus system time of this process, in clock ticks, from `/proc/self/stat`.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |ticks| ticks as f64)
}

/// This process's resident set size, from `/proc/self/status` (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|value| {
                    value
                        .trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_and_memory() {
        assert!(rss_bytes() > 1_000_000);
        let mut meter = CpuMeter::new();
        let spin_until = Instant::now() + Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < spin_until {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let share = meter.share_since_last();
        assert!(share > 0.3, "a busy loop shows as CPU: {share}");
    }
}
