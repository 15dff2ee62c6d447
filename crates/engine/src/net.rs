//! Where a tenant's calls may go. A tenant other than `default` reaches
//! only public addresses unless its policy says `private_network: true`:
//! its HTTP tools and its webhooks (callbacks, approval notifications)
//! cannot touch loopback, private, link-local (cloud metadata at
//! 169.254.169.254), carrier-grade NAT, unique-local or unspecified
//! addresses. Names are checked as they resolve, by the resolver of the
//! client those calls use ([`PublicResolver`]), so a name cannot resolve
//! to a public address when checked and a private one when connected;
//! addresses written in a URL are checked before the call ([`check_url`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use keel_core::config::Config;
use keel_core::ids::DEFAULT_TENANT;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Where a run's calls may go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Egress {
    /// Anywhere (the `default` tenant, or a tenant with `private_network`).
    Any,
    /// Public addresses only.
    Public,
}

impl Egress {
    /// The egress of `tenant`'s runs under `config`.
    pub fn of(config: &Config, tenant: &str) -> Egress {
        let private = tenant == DEFAULT_TENANT
            || config
                .tenants
                .get(tenant)
                .is_some_and(|t| t.private_network);
        if private { Egress::Any } else { Egress::Public }
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let shared = a == 100 && (64..128).contains(&b); // 100.64.0.0/10, carrier-grade NAT
    let this_network = a == 0; // 0.0.0.0/8
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || shared
        || this_network)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00; // fc00::/7
    let link_local = first & 0xffc0 == 0xfe80; // fe80::/10
    !(ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || unique_local || link_local)
}

/// The two clients calls go out on: `any` and `public` (the same
/// settings, with [`PublicResolver`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Clients {
    /// For runs of [`Egress::Any`].
    pub any: reqwest::Client,
    /// For runs of [`Egress::Public`].
    pub public: reqwest::Client,
}

impl Clients {
    /// Both clients from `builder` (the settings they share): `any` as is,
    /// `public` with [`PublicResolver`]. A builder that fails falls back to
    /// a default client (keeping the resolver for `public`).
    pub fn build(builder: impl Fn() -> reqwest::ClientBuilder) -> Clients {
        let resolver = || std::sync::Arc::new(PublicResolver);
        let public = builder()
            .dns_resolver(resolver())
            .build()
            .or_else(|_| reqwest::Client::builder().dns_resolver(resolver()).build())
            .unwrap_or_default();
        Clients {
            any: builder().build().unwrap_or_default(),
            public,
        }
    }

    /// The client a call of `egress` to `url` goes out on; a public-only
    /// call to an address written in the URL that is not public is refused
    /// here (a name is checked as it resolves).
    pub fn to(&self, egress: Egress, url: &reqwest::Url) -> Result<&reqwest::Client, String> {
        match egress {
            Egress::Any => Ok(&self.any),
            Egress::Public => check_url(url).map(|()| &self.public),
        }
    }
}

/// Refuses a URL whose host is an address (not a name) that is not public.
pub fn check_url(url: &reqwest::Url) -> Result<(), String> {
    // An IPv6 host is written in brackets; a name does not parse.
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(ip) = host.parse::<IpAddr>() else {
        return Ok(());
    };
    if is_public(ip) {
        Ok(())
    } else {
        Err(refused(ip))
    }
}

fn refused(ip: IpAddr) -> String {
    format!(
        "{ip} is not a public address: this tenant's calls reach public addresses only (tenants.<name>.private_network)"
    )
}

/// A resolver that drops every address that is not public, failing a name
/// that has none left.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicResolver;

impl Resolve for PublicResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let public: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| is_public(a.ip()))
                .collect();
            match (public.is_empty(), found.first()) {
                (false, _) => Ok(Box::new(public.into_iter()) as Addrs),
                (true, Some(first)) => Err(format!("`{host}`: {}", refused(first.ip())).into()),
                (true, None) => Err(format!("`{host}` resolves to no address").into()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_unicast_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = private.parse().expect("an address");
            assert!(!is_public(ip), "{private}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            let ip: IpAddr = public.parse().expect("an address");
            assert!(is_public(ip), "{public}");
        }
    }

    #[test]
    fn urls_naming_private_addresses_are_refused() {
        let url = |u: &str| reqwest::Url::parse(u).expect("a URL");
        assert!(check_url(&url("http://127.0.0.1:8080/x")).is_err());
        assert!(check_url(&url("http://[::1]/x")).is_err());
        assert!(check_url(&url("http://169.254.169.254/latest/meta-data")).is_err());
        assert!(check_url(&url("https://8.8.8.8/")).is_ok());
        // Names are the resolver's to check.
        assert!(check_url(&url("http://localhost/")).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_drops_private_addresses() {
        let name = |n: &str| n.parse::<Name>().expect("a name");
        let refused = PublicResolver.resolve(name("localhost")).await;
        let error = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("not a public address"), "{error}");
    }
}
