//! Untrusted text an operator's files may hold: the `ps run` TOML configuration (parsed,
//! then settled into settings with every value checked) and the `[ProxySettings]` file.
//! Each must parse or fail with a typed error, never panic.
#![no_main]

use churnlog::config::PsRunConfig;
use churnlog::proxy::ProxySettings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = PsRunConfig::parse(text) {
        let _ = cfg.settle();
    }
    if let Ok(proxy) = ProxySettings::parse(text) {
        // A parsed proxy always yields a URL, and never shows its password in Debug.
        let _ = proxy.url();
        if let Some((user, password)) = &proxy.credentials {
            // Only the password field must not show it: the host or user name may
            // contain the same text (the fuzzer found `Proxy IP = x"secret"` with
            // password `secret`).
            let others = format!("{:?}{:?}{:?}", proxy.host, proxy.port, user);
            if password.len() >= 4 && !others.contains(password.as_str()) {
                assert!(!format!("{proxy:?}").contains(password.as_str()), "Debug shows the password");
            }
        }
    }
});
