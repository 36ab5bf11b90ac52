//! The proxy settings file, in the format the seed's installer takes:
//!
//! ```text
//! [ProxySettings]
//! ProxyAuthentication = "Yes"
//! Proxy IP = "10.0.0.5"
//! ProxyPort = "3128"
//! ProxyUserName="user"
//! ProxyPassword="secret"
//! ```
//! Lines may start with `* ` (as the seed's example shows). The password is never printed.

#[derive(Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub host: String,
    pub port: u16,
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for ProxySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxySettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .field("password", &self.credentials.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    #[error("proxy settings: no [ProxySettings] section")]
    NoSection,
    #[error("proxy settings: missing {0}")]
    Missing(&'static str),
    #[error("proxy settings: bad {0}")]
    Bad(&'static str),
}

impl ProxySettings {
    pub fn parse(text: &str) -> Result<ProxySettings, ProxyError> {
        let mut in_section = false;
        let mut seen = false;
        let (mut auth, mut host, mut port, mut user, mut pass) = (None, None, None, None, None);
        for line in text.lines() {
            let line = line.trim().trim_start_matches('*').trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                in_section = line.eq_ignore_ascii_case("[ProxySettings]");
                seen |= in_section;
                continue;
            }
            if !in_section {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(ProxyError::Bad("line (expected key = \"value\")"));
            };
            let value = value.trim().trim_matches('"').to_string();
            match key.trim().to_ascii_lowercase().replace(' ', "").as_str() {
                "proxyauthentication" => auth = Some(value),
                "proxyip" => host = Some(value),
                "proxyport" => port = Some(value),
                "proxyusername" => user = Some(value),
                "proxypassword" => pass = Some(value),
                _ => {}
            }
        }
        if !seen {
            return Err(ProxyError::NoSection);
        }
        let host = host.filter(|h| !h.is_empty()).ok_or(ProxyError::Missing("Proxy IP"))?;
        let port = port.ok_or(ProxyError::Missing("ProxyPort"))?.parse().map_err(|_| ProxyError::Bad("ProxyPort"))?;
        let credentials = match auth.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("yes") => Some((
                user.ok_or(ProxyError::Missing("ProxyUserName"))?,
                pass.ok_or(ProxyError::Missing("ProxyPassword"))?,
            )),
            Some("no") | None => None,
            Some(_) => return Err(ProxyError::Bad("ProxyAuthentication (Yes or No)")),
        };
        Ok(ProxySettings { host, port, credentials })
    }

    /// The proxy URL for an HTTP client, credentials included.
    pub fn url(&self) -> String {
        match &self.credentials {
            Some((u, p)) => format!("http://{}:{}@{}:{}", pct(u), pct(p), self.host, self.port),
            None => format!("http://{}:{}", self.host, self.port),
        }
    }
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_seed_format() {
        let text = "[ProxySettings]\n* ProxyAuthentication = \"Yes\"\n* Proxy IP = \"10.0.0.5\"\n* ProxyPort = \"3128\"\n* ProxyUserName=\"dom\\user\"\n* ProxyPassword=\"p@ss\"\n";
        let p = ProxySettings::parse(text).unwrap();
        assert_eq!(p.url(), "http://dom%5Cuser:p%40ss@10.0.0.5:3128");
        assert!(!format!("{p:?}").contains("p@ss"), "the password must never be printed");
        let none = ProxySettings::parse(
            "[ProxySettings]\nProxyAuthentication = \"No\"\nProxy IP = \"h\"\nProxyPort = \"8080\"\n",
        )
        .unwrap();
        assert_eq!(none.url(), "http://h:8080");
        assert_eq!(ProxySettings::parse("Proxy IP = x"), Err(ProxyError::NoSection));
        assert!(ProxySettings::parse("[ProxySettings]\nProxy IP = \"h\"\nProxyPort = \"x\"\n").is_err());
    }
}
