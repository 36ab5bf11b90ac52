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
            // Differential: the same settings with another password must print the same.
            // (Searching the output for the password text gave false alarms whenever it
            // also appeared elsewhere: in the host, or in the struct's own name.)
            let mut other = proxy.clone();
            other.credentials = Some((user.clone(), format!("{password}-other")));
            assert_eq!(format!("{proxy:?}"), format!("{other:?}"), "Debug shows the password");
        }
    }
});
