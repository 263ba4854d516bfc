//! What the harness asks Linux: CPU time, RSS and open descriptors of a process from /proc,
//! the machine's TCP counters, the open-file limit, timer slack, CPU pinning.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _};

/// Sets the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
        lim.rlim_cur
    }
}

/// Clock ticks per second, the unit of utime and stime in /proc/PID/stat.
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Asks for precise sleeps (the default slack lets a sleep end up to 50 µs late).
pub fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Fields of /proc/PID/stat after the command name: [0] is field 3 (state).
fn stat_fields(pid: u32) -> io::Result<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    Ok(after.split_whitespace().map(str::to_owned).collect())
}

/// (utime, stime) of a process, all its threads (live and exited) included, in clock ticks.
pub fn cpu_ticks(pid: u32) -> io::Result<(u64, u64)> {
    let f = stat_fields(pid)?;
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok((utime, stime))
}

/// Resident set size (VmRSS) in KiB.
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kib = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .map_err(io::Error::other)?;
            return Ok(kib);
        }
    }
    Err(io::Error::other("no VmRSS line"))
}

/// The machine's `TcpExt` counters named `names` from /proc/net/netstat (what `nstat`
/// shows as `TcpExtNAME`), in that order; 0 for a name not found.
pub fn tcp_ext(names: &[&str]) -> Vec<u64> {
    let text = fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
        if !head.starts_with("TcpExt:") {
            continue;
        }
        let pairs: Vec<(&str, u64)> = head
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
            .map(|(k, v)| (k, v.parse().unwrap_or(0)))
            .collect();
        return names
            .iter()
            .map(|n| pairs.iter().find(|(k, _)| k == n).map_or(0, |p| p.1))
            .collect();
    }
    vec![0; names.len()]
}

/// The machine's listening TCP sockets (IPv4): (local port, connections waiting in the accept
/// queue now, the queue's size: the backlog given to `listen`), from the kernel's socket
/// diagnostics (netlink `SOCK_DIAG_BY_FAMILY`, what `ss -lnt` shows as Recv-Q and Send-Q).
pub fn listen_queues() -> io::Result<Vec<(u16, u32, u32)>> {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const TCP_LISTEN: u32 = 10;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    // SAFETY: a plain socket call; the descriptor is owned (and closed) by `fd` below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and nobody else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
    // nlmsghdr (16 bytes) + inet_diag_req_v2 (56 bytes): every IPv4 TCP socket in LISTEN.
    let mut req = [0u8; 72];
    req[0..4].copy_from_slice(&72u32.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[16] = libc::AF_INET as u8;
    req[17] = libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    // SAFETY: sends `req`'s bytes on our socket (to the kernel: no address needed).
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: receives into `buf`, at most its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0;
        let n = n as usize;
        while at + 16 <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if kind == NLMSG_DONE {
                return Ok(out);
            }
            if kind == NLMSG_ERROR || len < 16 || at + len > n {
                return Err(io::Error::other("sock_diag answered an error"));
            }
            // inet_diag_msg: family, state, timer, retrans (4 bytes), inet_diag_sockid (48:
            // the ports first, big-endian), expires, rqueue, wqueue, ...
            let msg = &buf[at + 16..at + len];
            if msg.len() >= 64 {
                let port = u16::from_be_bytes([msg[4], msg[5]]);
                let waiting = u32::from_ne_bytes(msg[56..60].try_into().expect("4 bytes"));
                let backlog = u32::from_ne_bytes(msg[60..64].try_into().expect("4 bytes"));
                out.push((port, waiting, backlog));
            }
            at += (len + 3) & !3;
        }
    }
}

/// Open file descriptors of a process (its sockets, once accepted, among them).
pub fn fd_count(pid: u32) -> io::Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Pins the calling thread (and the threads it starts later) to one CPU, as `taskset -c`
/// does for the processes the harness starts.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data (all zeroes is the empty set); CPU_SET indexes it with
    // a bounds check, and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Direct children of `pid` (nginx's worker under its master).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(f) = stat_fields(child) {
            if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out
}

/// CPU and memory of a set of processes at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// utime + stime.
    pub cpu_ticks: u64,
    /// utime alone: the part a proxy's own code can change (the rest is the kernel's TCP).
    pub user_ticks: u64,
    pub rss_kib: u64,
}

/// Sums [`cpu_ticks`] and [`rss_kib`] over `pids` (processes that vanished count as zero).
pub fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample::default();
    for &pid in pids {
        let (user, system) = cpu_ticks(pid).unwrap_or((0, 0));
        s.cpu_ticks += user + system;
        s.user_ticks += user;
        s.rss_kib += rss_kib(pid).unwrap_or(0);
    }
    s
}
