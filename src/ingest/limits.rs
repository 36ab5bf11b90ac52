//! What one peer may cost the server before and after login: slots for connections that
//! have not logged in yet (per address and in total), the login-failure throttle, the
//! accept loop's back-off, and the streams each machine may create in the cache.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::IngestStats;
use crate::cache::{Cache, StreamError, StreamId};

/// The unit the per-address limits count: an IPv4 address (IPv4-mapped IPv6 included),
/// or an IPv6 /64, because one IPv6 host is commonly given a whole /64 and could
/// otherwise present itself as 2^64 addresses.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// Raises this process's soft limit on open files to its hard limit and returns the
/// soft limit now in force. Distributions start services with a soft limit of 1,024,
/// which a server holding 1,024 login slots plus its sessions, cache segments and
/// object-store connections would hit (`EMFILE`) before its own caps; the hard limit
/// is the operator's real bound.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        setrlimit(Resource::Nofile, Rlimit { current: now.maximum, maximum: now.maximum })?;
    }
    Ok(getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX))
}

/// Why a connection was closed at accept, before TLS.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionRefusal {
    #[error("{0} connections from this address are already logging in")]
    PerAddress(usize),
    #[error("{0} connections are already logging in")]
    Total(usize),
    #[error("too many failed logins from this address: refused for {0:?} more")]
    Throttled(Duration),
}

/// Counts connections that have not logged in yet, so that a peer holding many of them
/// open (slow TLS, a trickled Hello) cannot exhaust memory or file descriptors: each
/// takes a slot at accept and gives it back when it logs in or closes.
pub struct LoginSlots {
    per_address_max: usize,
    total_max: usize,
    held: Mutex<(HashMap<IpAddr, usize>, usize)>,
    /// `logging_in` mirrors the total held.
    stats: Arc<IngestStats>,
}

/// One unauthenticated connection's slot; released on drop.
pub struct LoginSlot {
    slots: Arc<LoginSlots>,
    ip: IpAddr,
}

impl LoginSlots {
    pub fn new(per_address_max: usize, total_max: usize, stats: Arc<IngestStats>) -> Arc<LoginSlots> {
        Arc::new(LoginSlots { per_address_max, total_max, held: Mutex::new((HashMap::new(), 0)), stats })
    }

    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<LoginSlot, AdmissionRefusal> {
        let ip = address_key(ip);
        let mut held = self.held.lock();
        // The total is checked first: a full server refuses everyone alike.
        if held.1 >= self.total_max {
            return Err(AdmissionRefusal::Total(self.total_max));
        }
        let mine = held.0.entry(ip).or_insert(0);
        if *mine >= self.per_address_max {
            return Err(AdmissionRefusal::PerAddress(self.per_address_max));
        }
        *mine += 1;
        held.1 += 1;
        self.stats.logging_in.fetch_add(1, Ordering::Relaxed);
        Ok(LoginSlot { slots: self.clone(), ip })
    }

    /// Connections holding a slot now.
    pub fn held(&self) -> usize {
        self.held.lock().1
    }
}

impl Drop for LoginSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock();
        held.1 -= 1;
        self.slots.stats.logging_in.fetch_sub(1, Ordering::Relaxed);
        if let Some(n) = held.0.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.0.remove(&self.ip);
            }
        }
    }
}

/// Addresses the throttle remembers at most: an attacker with more addresses than this
/// makes it forget the ones not blocked right now, never grow without bound.
const THROTTLED_ADDRESSES_MAX: usize = 4096;
/// Failures older than this are forgotten at the address's next failure.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// Slows down passphrase guessing: after `free` failed logins from an address, each
/// further failure refuses that address's new connections for a while (`base`, doubling
/// per failure, at most `max`). A successful login from the address forgets its failures.
pub struct LoginThrottle {
    free: u32,
    base: Duration,
    max: Duration,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Option<Instant>,
}

impl LoginThrottle {
    pub fn new(free: u32, base: Duration, max: Duration) -> LoginThrottle {
        LoginThrottle { free, base, max, failures: Mutex::new(HashMap::new()) }
    }

    /// `Err(remaining)` while `ip` is blocked.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), AdmissionRefusal> {
        match self.failures.lock().get(&address_key(ip)).and_then(|f| f.blocked_until) {
            Some(until) if until > now => Err(AdmissionRefusal::Throttled(until - now)),
            _ => Ok(()),
        }
    }

    /// Records a failed login; returns the address's failure count.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> u32 {
        let ip = address_key(ip);
        let mut failures = self.failures.lock();
        if failures.len() >= THROTTLED_ADDRESSES_MAX && !failures.contains_key(&ip) {
            failures.retain(|_, f| f.blocked_until.is_some_and(|u| u > now));
            if failures.len() >= THROTTLED_ADDRESSES_MAX {
                return 0;
            }
        }
        let f = failures.entry(ip).or_insert(Failures { count: 0, last: now, blocked_until: None });
        if now.duration_since(f.last) > FAILURE_MEMORY {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if f.count > self.free {
            let doublings = (f.count - self.free - 1).min(16);
            f.blocked_until = Some(now + self.base.saturating_mul(1 << doublings).min(self.max));
        }
        f.count
    }

    pub fn succeeded(&self, ip: IpAddr) {
        self.failures.lock().remove(&address_key(ip));
    }
}

/// Back-off of the accept loop after a failed accept (most often EMFILE/ENFILE: out of
/// file descriptors). Retrying at once would spin a core while the condition lasts and
/// starve the sessions that would free descriptors by finishing.
#[derive(Default)]
pub struct AcceptBackoff {
    /// Zero after a success.
    delay: Duration,
}

const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// How long to wait after a failure: 10 ms, doubling, at most 1 s.
    fn failed(&mut self) -> Duration {
        self.delay = if self.delay.is_zero() { ACCEPT_BACKOFF_FIRST } else { (self.delay * 2).min(ACCEPT_BACKOFF_MAX) };
        self.delay
    }

    fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// Calls `accept` until it succeeds, sleeping per `backoff` after each failure (counted
/// in `stats.accept_errors`, logged once per run of failures).
pub async fn accept_with_backoff<T, F, Fut>(mut accept: F, backoff: &mut AcceptBackoff, stats: &IngestStats) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<T>>,
{
    loop {
        match accept().await {
            Ok(t) => {
                backoff.succeeded();
                return t;
            }
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                let first = backoff.delay.is_zero();
                let delay = backoff.failed();
                if first {
                    tracing::warn!(error = %e, "accept failed; backing off");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Why an OpenDisk did not get a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamQuotaError {
    #[error("machine {machine:?} has {max} disk streams already")]
    MachineFull { machine: String, max: usize },
    #[error("{0}")]
    Cache(#[from] StreamError),
}

/// Bounds the streams each machine may create, across all its sessions: the cache holds
/// at most `STREAMS_MAX` streams in all, never forgets one, and rewrites META for each
/// new one, so an agent renaming its disks without end would otherwise block every new
/// disk of every machine.
pub struct StreamQuota {
    per_machine_max: usize,
    /// Streams each machine has in the cache (seeded from the cache at start).
    counts: Mutex<HashMap<String, usize>>,
}

impl StreamQuota {
    pub fn new(cache: &Cache, per_machine_max: usize) -> StreamQuota {
        let mut counts = HashMap::new();
        for s in cache.streams() {
            *counts.entry(s.machine).or_insert(0) += 1;
        }
        StreamQuota { per_machine_max, counts: Mutex::new(counts) }
    }

    /// The stream of (`machine`, `disk`): an existing one, or a new one within the quota.
    pub fn open(&self, cache: &Cache, machine: &str, disk: &str) -> Result<StreamId, StreamQuotaError> {
        if let Some(id) = cache.find_stream(machine, disk) {
            return Ok(id);
        }
        // Held across the creation, so two sessions of one machine cannot both take the
        // last place; creating streams is rare (a machine's disks, once).
        let mut counts = self.counts.lock();
        if let Some(id) = cache.find_stream(machine, disk) {
            return Ok(id);
        }
        let n = counts.get(machine).copied().unwrap_or(0);
        if n >= self.per_machine_max {
            return Err(StreamQuotaError::MachineFull { machine: machine.to_string(), max: self.per_machine_max });
        }
        let id = cache.stream(machine, disk)?;
        *counts.entry(machine.to_string()).or_insert(0) += 1;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn login_slots_cap_each_address_and_the_total_and_come_back_on_drop() {
        let slots = LoginSlots::new(2, 3, Arc::new(IngestStats::default()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = slots.try_take(a).unwrap();
        let _a2 = slots.try_take(a).unwrap();
        assert_eq!(slots.try_take(a).err(), Some(AdmissionRefusal::PerAddress(2)));
        let _b1 = slots.try_take(b).unwrap();
        assert_eq!(slots.try_take(b).err(), Some(AdmissionRefusal::Total(3)));
        drop(a1);
        assert_eq!(slots.held(), 2);
        let _b2 = slots.try_take(b).unwrap();
    }

    #[test]
    fn addresses_count_per_ipv4_address_and_per_ipv6_64() {
        let key = |s: &str| address_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
    }

    #[test]
    fn login_failures_block_an_address_after_the_free_ones_doubling_and_reset_on_success() {
        let t = LoginThrottle::new(2, Duration::from_secs(1), Duration::from_secs(3));
        let (ip, other): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = Instant::now();
        t.failed(ip, now);
        t.failed(ip, now);
        assert_eq!(t.check(ip, now), Ok(()), "the first two failures are free");
        t.failed(ip, now);
        assert_eq!(t.check(ip, now), Err(AdmissionRefusal::Throttled(Duration::from_secs(1))));
        assert_eq!(t.check(other, now), Ok(()), "other addresses are not affected");
        t.failed(ip, now);
        assert_eq!(t.check(ip, now), Err(AdmissionRefusal::Throttled(Duration::from_secs(2))));
        t.failed(ip, now);
        assert_eq!(t.check(ip, now), Err(AdmissionRefusal::Throttled(Duration::from_secs(3))), "capped");
        assert_eq!(t.check(ip, now + Duration::from_secs(3)), Ok(()), "the block ends");
        t.succeeded(ip);
        t.failed(ip, now);
        assert_eq!(t.check(ip, now), Ok(()), "a success forgets the failures");
    }

    /// Out of file descriptors, the accept loop must sleep between attempts. The fake
    /// listener fails 10,000 times (then never answers again), so a loop that retried at
    /// once would make 10,000 attempts within the first (virtual) seconds.
    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_instead_of_spinning() {
        let stats = Arc::new(IngestStats::default());
        let attempts = Arc::new(AtomicU64::new(0));
        let (stats2, attempts2) = (stats.clone(), attempts.clone());
        let task = tokio::spawn(async move {
            let mut backoff = AcceptBackoff::default();
            let accept = || {
                let attempts = attempts2.clone();
                async move {
                    tokio::task::yield_now().await;
                    if attempts.fetch_add(1, Ordering::Relaxed) >= 10_000 {
                        std::future::pending::<()>().await;
                    }
                    Err::<(), _>(std::io::Error::from_raw_os_error(24)) // EMFILE
                }
            };
            accept_with_backoff(accept, &mut backoff, &stats2).await
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        task.abort();
        let n = attempts.load(Ordering::Relaxed);
        // 10 ms doubling to 1 s: 7 attempts in the first 1.27 s, then one a second.
        assert!((5..=20).contains(&n), "{n} accept attempts in 10 s");
        assert_eq!(stats.accept_errors.load(Ordering::Relaxed), n);
    }
}
