//! `churnlog ps decommission`: ask the CS to move every machine off this process server,
//! wait (bounded) until the CS shows it with no machine and no backlog, then unregister
//! it. Refuses while data would be lost (no other server can take its machines, or the
//! wait ran out with data pending) unless forced; forced, it first says exactly which
//! machines and how many bytes, then unregisters with purge.

use std::time::{Duration, Instant};

use super::api::{self, Decommission, PsState, PsStatus, StatusReport, Unregister, Unregistered};
use super::client::{ClientError, CsClient};

#[derive(Debug, thiserror::Error)]
pub enum DecommissionError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("process server {0:?} is not registered with the configuration server")]
    Unknown(String),
    #[error("no other connected, healthy process server can take the machines of {ps:?} ({machines}); add one, or use --force to purge them and lose {backlog_bytes} bytes not yet uploaded")]
    NoOtherServer { ps: String, machines: String, backlog_bytes: u64 },
    #[error("{ps:?} still has {machines} machine(s) and {backlog_bytes} bytes not uploaded after {waited:?}; wait longer (--wait-seconds) or use --force to purge and lose them")]
    TimedOut { ps: String, machines: u64, backlog_bytes: u64, waited: Duration },
}

/// What the wait sees each round.
#[derive(Debug, Clone)]
pub struct Progress {
    pub machines: u64,
    pub backlog_bytes: u64,
    pub elapsed: Duration,
}

/// What would be lost by a forced removal.
#[derive(Debug, Clone, PartialEq)]
pub struct Loss {
    pub machines: Vec<String>,
    pub backlog_bytes: u64,
}

impl std::fmt::Display for Loss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = if self.machines.is_empty() { "none".to_string() } else { self.machines.join(", ") };
        write!(
            f,
            "{} machine(s): {names}; {} bytes cached and not uploaded will be lost (each machine's disks are marked resync-required)",
            self.machines.len(),
            self.backlog_bytes
        )
    }
}

/// How the decommission ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every machine moved and every byte uploaded; unregistered.
    Clean,
    /// Forced: unregistered with purge, losing this.
    Purged { lost: Loss, unregistered: Unregistered },
}

fn find<'a>(status: &'a StatusReport, ps: &str) -> Option<&'a PsStatus> {
    status.process_servers.iter().find(|p| p.id == ps)
}

fn machines_of(status: &StatusReport, ps: &str) -> Vec<String> {
    let mut v: Vec<String> =
        status.machines.iter().filter(|m| m.ps.as_deref() == Some(ps)).map(|m| m.name.clone()).collect();
    v.sort();
    v
}

/// Whether another server could take the machines: connected, not critical, not itself
/// being decommissioned.
pub fn other_server_available(status: &StatusReport, ps: &str) -> bool {
    status.process_servers.iter().any(|p| {
        p.id != ps && p.state == PsState::Connected && p.health != api::HealthLevel::Critical && !p.decommissioning
    })
}

/// Runs the decommission of `ps`. `confirm_loss` is called with what a forced removal
/// loses before it happens (the CLI prints it).
pub async fn decommission(
    client: &CsClient,
    ps: &str,
    force: bool,
    wait: Duration,
    poll: Duration,
    mut progress: impl FnMut(&Progress),
    mut confirm_loss: impl FnMut(&Loss),
) -> Result<Outcome, DecommissionError> {
    let status: StatusReport = client.get(api::PATH_STATUS).await?;
    let me = find(&status, ps).ok_or_else(|| DecommissionError::Unknown(ps.to_string()))?;
    let has_data = me.machines > 0 || me.backlog_bytes > 0;
    if has_data && !other_server_available(&status, ps) {
        let lost = Loss { machines: machines_of(&status, ps), backlog_bytes: me.backlog_bytes };
        if !force {
            return Err(DecommissionError::NoOtherServer {
                ps: ps.to_string(),
                machines: lost.machines.join(", "),
                backlog_bytes: lost.backlog_bytes,
            });
        }
        return purge(client, ps, lost, &mut confirm_loss).await;
    }
    let _: serde_json::Value = client.post(api::PATH_PS_DECOMMISSION, &Decommission { ps: ps.to_string() }).await?;
    let started = Instant::now();
    loop {
        let status: StatusReport = client.get(api::PATH_STATUS).await?;
        let me = find(&status, ps).ok_or_else(|| DecommissionError::Unknown(ps.to_string()))?;
        progress(&Progress { machines: me.machines, backlog_bytes: me.backlog_bytes, elapsed: started.elapsed() });
        if me.machines == 0 && me.backlog_bytes == 0 {
            let _: Unregistered = client
                .post(api::PATH_PS_UNREGISTER, &Unregister { ps: ps.to_string(), purge: false, force: false })
                .await?;
            return Ok(Outcome::Clean);
        }
        if started.elapsed() >= wait {
            let lost = Loss { machines: machines_of(&status, ps), backlog_bytes: me.backlog_bytes };
            if !force {
                return Err(DecommissionError::TimedOut {
                    ps: ps.to_string(),
                    machines: me.machines,
                    backlog_bytes: me.backlog_bytes,
                    waited: started.elapsed(),
                });
            }
            return purge(client, ps, lost, &mut confirm_loss).await;
        }
        tokio::time::sleep(poll).await;
    }
}

async fn purge(
    client: &CsClient,
    ps: &str,
    lost: Loss,
    confirm_loss: &mut impl FnMut(&Loss),
) -> Result<Outcome, DecommissionError> {
    confirm_loss(&lost);
    let unregistered: Unregistered =
        client.post(api::PATH_PS_UNREGISTER, &Unregister { ps: ps.to_string(), purge: true, force: true }).await?;
    Ok(Outcome::Purged { lost, unregistered })
}
