//! The CS's status page in headless Chromium: a CS with two process servers heartbeating
//! through the real client; the page (token in the URL fragment) shows both connected,
//! then one disconnected once it stops reporting. Outside CI a missing `chromium` skips
//! with a message; with `CI` set it fails.

mod cs_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use churnlog::control::api::{HealthLevel, PsState};
use cs_support::*;

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("chromium")).find(|p| p.exists())
}

/// The page's DOM after its script ran (Chromium killed if it takes over 90 s).
fn dump_dom(chromium: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--ignore-certificate-errors",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// The `data-state` of the process server's row, if the page shows it.
fn row_state(dom: &str, ps: &str) -> Option<String> {
    let at = dom.find(&format!("data-ps=\"{ps}\""))?;
    let start = dom[..at].rfind("<tr")?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let s = tag.find("data-state=\"")? + "data-state=\"".len();
    Some(tag[s..s + tag[s..].find('"')?].to_string())
}

/// Dumps until the page shows what is expected (the script fetches asynchronously;
/// a slow first fetch may miss one dump), at most a few tries.
async fn dom_showing(chromium: &Path, url: &str, expect: &[(&str, &str)]) -> String {
    let mut dom = String::new();
    for _ in 0..4 {
        let (c, u) = (chromium.to_path_buf(), url.to_string());
        dom = tokio::task::spawn_blocking(move || dump_dom(&c, &u)).await.unwrap();
        if expect.iter().all(|(ps, state)| row_state(&dom, ps).as_deref() == Some(*state)) {
            return dom;
        }
    }
    panic!("the status page never showed {expect:?}; last DOM:\n{dom}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_servers_and_a_disconnection() {
    let Some(chromium) = chromium() else {
        missing("chromium", "apt-get install chromium");
        return;
    };
    let rig = CsRig::start(Backend::Sqlite, Duration::from_secs(3)).await.unwrap();
    let c = rig.client();
    register_ps(&c, "ps-one", &rig.cs.cert_pem).await;
    register_ps(&c, "ps-two", &rig.cs.cert_pem).await;
    let mut hb_one = heartbeat("ps-one", 71.5, HealthLevel::Ok);
    hb_one.machines = vec![machine_report("m1", 12.0)];
    let one = keep_beating(rig.client(), hb_one);
    let two = keep_beating(rig.client(), heartbeat("ps-two", 55.0, HealthLevel::Ok));
    register_machine(&c, "m1").await.unwrap();
    wait_until(Duration::from_secs(60), "both servers connected", || {
        let c = c.clone();
        async move { status(&c).await.process_servers.iter().all(|p| p.state == PsState::Connected) }
    })
    .await;

    let url = format!("https://{}/status#view={}", rig.address(), rig.cs.status_view_token());
    let dom = dom_showing(&chromium, &url, &[("ps-one", "connected"), ("ps-two", "connected")]).await;
    assert!(dom.contains("data-machine=\"m1\""), "the machine is listed:\n{dom}");

    // Without the token the page shows data from nowhere: no rows.
    let bare = format!("https://{}/status", rig.address());
    let (cc, bu) = (chromium.clone(), bare.clone());
    let dom = tokio::task::spawn_blocking(move || dump_dom(&cc, &bu)).await.unwrap();
    assert!(row_state(&dom, "ps-one").is_none(), "no data without the token");
    assert!(dom.contains("No view token"), "{dom}");

    two.abort();
    let _ = two.await;
    wait_until(Duration::from_secs(60), "ps-two disconnected", || {
        let c = c.clone();
        async move {
            status(&c).await.process_servers.iter().any(|p| p.id == "ps-two" && p.state == PsState::Disconnected)
        }
    })
    .await;
    let dom = dom_showing(&chromium, &url, &[("ps-one", "connected"), ("ps-two", "disconnected")]).await;
    assert!(dom.contains("heartbeat_missing"), "the alert shows:\n{dom}");
    one.abort();
    rig.stop().await;
}
