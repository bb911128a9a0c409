//! Starting the `ferry` binary under a program named by an environment variable, for the
//! benches (included with `#[path]`: a file here is no bench of its own).

use std::process::Command;

/// `ferry`, or `$<var> ferry` when the variable names a program (with its arguments): a
/// profiler (`heaptrack -o /tmp/gw`), or for A/B runs a script that `exec`s another build with
/// the arguments after the first. The figures read from the process started (RSS, CPU) are the
/// wrapper's unless it `exec`s.
pub fn ferry_command(var: &str, ferry: &str) -> Command {
    let wrapper = std::env::var(var).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(ferry);
            cmd
        }
        None => Command::new(ferry),
    }
}
