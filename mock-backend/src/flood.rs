//! The `flood:BYTES` fault: log output as fast as the reader takes it,
//! including lines over 1 MiB, from a thread of its own so serving goes on.

use std::io::Write;

/// Every this many lines, one very long line (when the budget allows).
const LONG_LINE_EVERY: u64 = 16;
const LONG_LINE_BYTES: u64 = (1 << 20) + (1 << 18);

pub fn start(budget: u64) {
    std::thread::spawn(move || flood(budget));
}

fn flood(budget: u64) {
    let mut written: u64 = 0;
    let mut line_number: u64 = 0;
    let mut long_lines: u64 = 0;
    while written < budget {
        line_number += 1;
        let remaining = budget - written;
        let line = if line_number.is_multiple_of(LONG_LINE_EVERY) && remaining > LONG_LINE_BYTES {
            long_lines += 1;
            let mut line = format!("flood {line_number:08} long: ");
            line.extend(std::iter::repeat_n(
                'x',
                LONG_LINE_BYTES as usize - line.len() - 1,
            ));
            line
        } else {
            let mut line = format!(
                "flood {line_number:08}: INFO Decode batch. #running-req: 1, #token: {line_number}, \
                 gen throughput (token/s): 42.00, #queue-req: 0"
            );
            line.truncate((remaining.max(1) - 1).min(line.len() as u64) as usize);
            line
        };
        let mut stdout = std::io::stdout().lock();
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return;
        }
        written += line.len() as u64 + 1;
    }
    crate::log::out(format!(
        "flood done: {written} bytes in {line_number} lines, {long_lines} over 1 MiB"
    ));
}
