//! The configuration server's HTTP API: paths and JSON bodies (`docs/protocol.md` §9).
//! Every request except the status page's HTML is signed ([`super::auth`]); every body is
//! capped at [`BODY_BYTES_MAX`]. Errors are `{"error": "...", "code": "..."}` with a
//! fitting HTTP status ([`ApiError`]).

use serde::{Deserialize, Serialize};

/// Largest request or response body either side accepts (a heartbeat with a few hundred
/// machines is tens of kilobytes; a status of 20,000 machines a few megabytes).
pub const BODY_BYTES_MAX: usize = 16 << 20;

/// Longest process server id or machine name accepted (as on the data path).
pub const NAME_LEN_MAX: usize = 64;

pub const PATH_PS_REGISTER: &str = "/api/v1/ps/register";
pub const PATH_PS_HEARTBEAT: &str = "/api/v1/ps/heartbeat";
pub const PATH_PS_UNREGISTER: &str = "/api/v1/ps/unregister";
pub const PATH_PS_DECOMMISSION: &str = "/api/v1/ps/decommission";
pub const PATH_MACHINE_REGISTER: &str = "/api/v1/machines/register";
pub const PATH_MACHINE_ASSIGNMENT: &str = "/api/v1/machines/assignment";
pub const PATH_MACHINE_REASSIGN: &str = "/api/v1/machines/reassign";
pub const PATH_MIGRATE: &str = "/api/v1/migrate";
pub const PATH_STATUS: &str = "/api/v1/status";
pub const PATH_STATUS_PAGE: &str = "/status";
pub const PATH_METRICS: &str = "/metrics";

/// A name is 1..=64 bytes of `[A-Za-z0-9._-]` (process server ids and machine names).
pub fn check_name(what: &'static str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_LEN_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!("{what} {name:?}: 1 to {NAME_LEN_MAX} characters of A-Z a-z 0-9 . _ -")))
    }
}

/// The error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// Machine-readable: `bad_request`, `unauthorized`, `not_found`, `conflict`,
    /// `version`, `unavailable`, `internal`.
    pub code: String,
    /// One sentence for the operator.
    pub error: String,
}

impl ApiError {
    pub fn new(code: &str, error: impl Into<String>) -> ApiError {
        ApiError { code: code.to_string(), error: error.into() }
    }
    pub fn bad_request(error: impl Into<String>) -> ApiError {
        ApiError::new("bad_request", error)
    }
    /// The HTTP status that goes with the code.
    pub fn status(&self) -> u16 {
        match self.code.as_str() {
            "bad_request" => 400,
            "unauthorized" => 401,
            "not_found" => 404,
            "conflict" => 409,
            "version" => 409,
            "unavailable" => 503,
            _ => 500,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error, self.code)
    }
}

/// `POST /api/v1/ps/register` (passphrase): a process server registers or re-registers
/// (after a proxy change, a new certificate or address). Refused with `version` when the
/// process server is newer than the CS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PsRegistration {
    pub id: String,
    /// host:port agents connect to.
    pub address: String,
    /// The process server's TLS certificate (PEM), handed to its agents.
    pub cert_pem: String,
    pub version: String,
    pub cache_size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PsRegistered {
    pub cs_version: String,
    /// Seconds between heartbeats the CS expects.
    pub heartbeat_interval_seconds: u64,
}

/// Health level: worst of the alerts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "lowercase")]
pub enum HealthLevel {
    #[default]
    Ok,
    Warning,
    Critical,
}

/// One alert: what, how bad, a sentence with the figure.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Alert {
    /// `cache_free`, `ingest_throttled`, `upload_backlog`, `cpu`, `memory`,
    /// `heartbeat_missing`, `resync_required`, `rpo`.
    pub kind: String,
    pub level: HealthLevel,
    pub message: String,
}

/// One machine as its process server sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct MachineReport {
    pub name: String,
    /// Age of the newest uploaded point's last write; None before the first upload.
    pub rpo_seconds: Option<f64>,
    pub resync_required: bool,
    /// Bytes cached for this machine and not yet uploaded.
    pub pending_bytes: u64,
}

/// `POST /api/v1/ps/heartbeat` (passphrase): a process server's periodic report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Heartbeat {
    pub id: String,
    pub version: String,
    pub health: HealthLevel,
    pub alerts: Vec<Alert>,
    pub cache_size_bytes: u64,
    pub cache_free_percent: f64,
    pub backlog_bytes: u64,
    /// Bytes received per second since the last heartbeat (the churn, for placement).
    pub ingest_bytes_per_second: f64,
    pub upload_bytes_per_second: f64,
    pub cpu_percent: f64,
    pub memory_percent: f64,
    pub machines: Vec<MachineReport>,
    /// Machines this server was told to give up ([`MachineState::MovingAway`]) whose
    /// cached data is all uploaded and whose sessions are closed: the CS may hand them on.
    pub released: Vec<String>,
    /// Machines whose disks this server has marked resync-required as the CS asked
    /// ([`AssignedMachine::resync_required`]).
    pub resync_applied: Vec<String>,
}

/// What a process server should do with a machine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Accept its sessions.
    Active,
    /// Moving to another server: accept no new session, upload everything cached for
    /// it, then report it in [`Heartbeat::released`].
    MovingAway,
}

/// A machine assigned to the process server, with the credential its agent logs in with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AssignedMachine {
    pub name: String,
    /// The machine's credential (hex of 32 bytes): the key its agent's login MAC is
    /// checked with.
    pub credential: String,
    pub state: MachineState,
    /// The CS purged the server this machine was on, losing cached data: mark its disks
    /// resync-required when it opens them, then report it in [`Heartbeat::resync_applied`].
    pub resync_required: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HeartbeatReply {
    pub machines: Vec<AssignedMachine>,
    /// Every machine assigned to this server, also those without a credential (an
    /// operator's reassign): whose cached records it uploads. Absent from an older CS:
    /// then `machines`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owned: Option<Vec<String>>,
    /// The operator asked to decommission this server: accept no new machine.
    pub decommissioning: bool,
}

/// `POST /api/v1/machines/register` (passphrase): an agent registers its machine once and
/// receives its own credential. Refused with `conflict` when the name is taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineRegistration {
    pub name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineRegistered {
    /// Hex of 32 random bytes; keep it 0600.
    pub credential: String,
}

/// `GET /api/v1/machines/assignment` (machine credential): where the machine replicates.
/// `unavailable` while it moves between servers or when no server can take it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub ps: String,
    pub address: String,
    pub cert_pem: String,
}

/// `POST /api/v1/machines/reassign` (passphrase, operator): forget the machine's
/// credential so that a (new) machine may register the name again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reassign {
    pub name: String,
}

/// `POST /api/v1/migrate` (passphrase, operator): move one machine, or every machine of
/// a server, to another server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Migrate {
    pub machine: Option<String>,
    pub all_from: Option<String>,
    pub to: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Migrated {
    pub machines: Vec<String>,
}

/// `POST /api/v1/ps/unregister` (passphrase, operator): remove a process server. Without
/// `purge` only one with no machines; with `purge` also a disconnected one: its machines
/// go to other servers and are marked resync-required. `force` (with `purge`) also
/// purges a connected one: `churnlog ps decommission --force`, run on that server by an
/// operator who accepts losing what it has cached.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unregister {
    pub ps: String,
    pub purge: bool,
    #[serde(default)]
    pub force: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unregistered {
    /// (machine, new server) for every machine moved.
    pub moved: Vec<(String, String)>,
    pub resync_required: Vec<String>,
}

/// `POST /api/v1/ps/decommission` (passphrase): start moving every machine off a server
/// and stop assigning new ones to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decommission {
    pub ps: String,
}

/// Connected or not, by heartbeat age.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PsState {
    Connected,
    Disconnected,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PsStatus {
    pub id: String,
    pub address: String,
    pub version: String,
    pub state: PsState,
    pub health: HealthLevel,
    pub alerts: Vec<Alert>,
    pub cache_free_percent: f64,
    pub backlog_bytes: u64,
    pub machines: u64,
    pub decommissioning: bool,
    /// Seconds since the last heartbeat; None before the first.
    pub heartbeat_age_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineStatus {
    pub name: String,
    /// The server it is assigned to (None: none could take it).
    pub ps: Option<String>,
    /// Set while it moves.
    pub moving_to: Option<String>,
    pub rpo_seconds: Option<f64>,
    pub resync_required: bool,
}

/// `GET /api/v1/status` (passphrase or the status view token).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub cs_version: String,
    pub process_servers: Vec<PsStatus>,
    pub machines: Vec<MachineStatus>,
}
