//! What the running kernel offers of what the agent uses, probed at start (never read off
//! the version number: distributions backport). A feature the agent cannot do without
//! makes it refuse to start, naming the feature and the Linux version that brought it,
//! before anything is loaded or changed; one it can do without is listed as degraded, with
//! what is lost, in the log and in `bridge-ctl status`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bpf::sys;

/// `BPF_PROG_TYPE_CGROUP_SOCK_ADDR`, `BPF_PROG_TYPE_CGROUP_SOCKOPT`.
const PROG_SOCK_ADDR: u32 = 18;
const PROG_SOCKOPT: u32 = 25;
/// `enum bpf_attach_type`.
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_RECVMSG: u32 = 19;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
/// `enum bpf_func_id`.
const HELPER_GET_CURRENT_UID_GID: i32 = 15;
const HELPER_GET_CURRENT_COMM: i32 = 16;
const HELPER_SK_STORAGE_GET: i32 = 107;
const HELPER_GET_NETNS_COOKIE: i32 = 122;
const HELPER_SET_RETVAL: i32 = 187;

/// A kernel feature the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Feature {
    SockAddrHooks,
    RecvmsgHooks,
    GetpeernameHooks,
    SetsockoptHook,
    CgroupLinks,
    LinkUpdate,
    NetnsCookieHelper,
    SocketStorage,
    CallerHelpers,
    NetnsCookieSockopt,
    SetRetval,
    SockDestroy,
}

/// What the agent does without a feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Without {
    /// It refuses to start.
    Refuse,
    /// It starts; this is lost.
    Degrade(&'static str),
}

/// A feature as the operator reads about it.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub feature: Feature,
    /// Its name in messages and in `bridge-ctl status`.
    pub name: &'static str,
    /// The Linux version that brought it (or the build option it needs).
    pub since: &'static str,
    /// What the agent uses it for.
    pub used_for: &'static str,
    pub without: Without,
}

/// Every feature the agent uses, in the order they are reported.
pub const SPECS: &[Spec] = &[
    Spec {
        feature: Feature::SockAddrHooks,
        name: "cgroup connect/sendmsg/bind hooks",
        since: "Linux 4.18",
        used_for: "translating connections and datagrams to published ports",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::RecvmsgHooks,
        name: "cgroup recvmsg hooks",
        since: "Linux 5.2",
        used_for: "showing UDP replies from the published address",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::GetpeernameHooks,
        name: "cgroup getpeername hooks",
        since: "Linux 5.8",
        used_for: "showing translated sockets' peer as the published address",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::SetsockoptHook,
        name: "cgroup setsockopt hook",
        since: "Linux 5.3",
        used_for: "knowing which IPv6 sockets are IPv6-only",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::CgroupLinks,
        name: "BPF links (BPF_LINK_CREATE)",
        since: "Linux 5.7",
        used_for: "pinning the hooks so they outlive an agent restart",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::LinkUpdate,
        name: "BPF link update (BPF_LINK_UPDATE)",
        since: "Linux 5.7",
        used_for: "swapping in a new build's programs without a moment uncovered",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::NetnsCookieHelper,
        name: "bpf_get_netns_cookie in socket hooks",
        since: "Linux 5.7",
        used_for: "telling the host's clients from containers'",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::SocketStorage,
        name: "socket storage in socket hooks (bpf_sk_storage_get)",
        since: "Linux 5.3 (setsockopt), 5.10 or older (connect)",
        used_for: "recording each translation for getpeername and the socket reset",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::CallerHelpers,
        name: "bpf_get_current_uid_gid/comm in socket hooks",
        since: "Linux 5.10 or older",
        used_for: "never refusing Docker's own bind of a published port",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::NetnsCookieSockopt,
        name: "SO_NETNS_COOKIE",
        since: "Linux 5.14",
        used_for: "naming the host's and containers' network namespaces to the programs",
        without: Without::Refuse,
    },
    Spec {
        feature: Feature::SetRetval,
        name: "bpf_set_retval",
        since: "Linux 5.18",
        used_for: "refusing a bind() to a published port with EADDRINUSE, a connect() to \
                   a paused on-pause=reset container with ECONNREFUSED",
        without: Without::Degrade(
            "no port reservation: a host process may bind a published port (its clients \
             still reach the container); a connect() to a paused on-pause=reset container \
             fails with EPERM instead of ECONNREFUSED",
        ),
    },
    Spec {
        feature: Feature::SockDestroy,
        name: "socket destruction (SOCK_DESTROY)",
        since: "CONFIG_INET_DIAG_DESTROY (Linux 4.5)",
        used_for: "resetting translated connections at once when their container goes away \
                   or pauses with on-pause=reset",
        without: Without::Degrade(
            "translated connections to a container that went away wait for TCP's timeout \
             (as over Docker's own path), and on-pause=reset refuses new connections but \
             leaves open ones waiting",
        ),
    },
];

/// The spec of `f`.
pub fn spec(f: Feature) -> &'static Spec {
    SPECS
        .iter()
        .find(|s| s.feature == f)
        .expect("every feature has a spec")
}

/// What a probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    Present,
    Absent,
    /// The probe could not tell (its error).
    Unknown(String),
}

/// The probes' results, and the kernel they ran on.
#[derive(Clone, Debug)]
pub struct Features {
    pub kernel: String,
    found: BTreeMap<Feature, Found>,
}

impl Features {
    /// Every feature present (for tests and for builds that never probe).
    pub fn all(kernel: &str) -> Self {
        Self {
            kernel: kernel.to_string(),
            found: SPECS.iter().map(|s| (s.feature, Found::Present)).collect(),
        }
    }

    /// These results, with `missing` taken as absent (tests of the fallbacks).
    #[must_use]
    pub fn without(mut self, missing: &[Feature]) -> Self {
        for f in missing {
            self.found.insert(*f, Found::Absent);
        }
        self
    }

    pub fn from_found(kernel: &str, found: BTreeMap<Feature, Found>) -> Self {
        Self {
            kernel: kernel.to_string(),
            found,
        }
    }

    /// Probes the running kernel (needs the privileges the agent runs with).
    pub fn probe() -> Self {
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let found = SPECS
            .iter()
            .map(|s| (s.feature, probe_one(s.feature)))
            .collect();
        Self { kernel, found }
    }

    pub fn has(&self, f: Feature) -> bool {
        self.found.get(&f) == Some(&Found::Present)
    }

    /// Whether a probe was refused for want of privilege (`EPERM`): then nothing is known
    /// of the kernel, only that this process may not load programs.
    pub fn denied(&self) -> bool {
        self.found
            .values()
            .any(|f| matches!(f, Found::Unknown(e) if e.contains("Operation not permitted")))
    }

    /// Refuses, naming every missing feature the agent cannot do without.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.denied() {
            anyhow::bail!(
                "probing the kernel's features was not permitted (EPERM): the agent loads \
                 BPF programs and must run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); \
                 nothing was changed"
            );
        }
        let missing: Vec<String> = SPECS
            .iter()
            .filter(|s| s.without == Without::Refuse && !self.has(s.feature))
            .map(|s| {
                let how = match self.found.get(&s.feature) {
                    Some(Found::Unknown(e)) => format!(" (the probe failed: {e})"),
                    _ => String::new(),
                };
                format!("{} ({}, for {}){how}", s.name, s.since, s.used_for)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "this kernel ({}) lacks what the agent needs: {}; nothing was changed, and \
             Docker's own path keeps serving (docs/engines-and-kernels.md says which \
             kernels work)",
            self.kernel,
            missing.join("; ")
        )
    }

    /// Each feature's state, as `bridge-ctl status` shows it.
    pub fn states(&self) -> Vec<dataplane_api::FeatureState> {
        SPECS
            .iter()
            .map(|s| {
                let (state, effect) = match (self.found.get(&s.feature), s.without) {
                    (Some(Found::Present), _) => ("active", String::new()),
                    (Some(Found::Unknown(e)), _) => ("unknown", format!("the probe failed: {e}")),
                    (_, Without::Degrade(lost)) => ("degraded", lost.to_string()),
                    (_, Without::Refuse) => ("missing", "the agent cannot run".to_string()),
                };
                dataplane_api::FeatureState {
                    name: s.name.to_string(),
                    since: s.since.to_string(),
                    state: state.to_string(),
                    effect,
                }
            })
            .collect()
    }

    /// Log lines for the start: the kernel, and each degraded feature.
    pub fn log(&self) {
        let absent: Vec<&str> = SPECS
            .iter()
            .filter(|s| !self.has(s.feature))
            .map(|s| s.name)
            .collect();
        tracing::info!(kernel = %self.kernel, features = SPECS.len() - absent.len(), absent = ?absent, "kernel features probed");
        for s in SPECS.iter().filter(|s| !self.has(s.feature)) {
            if let Without::Degrade(lost) = s.without {
                tracing::warn!(feature = s.name, needs = s.since, "degraded: {lost}");
            }
        }
    }
}

fn found(r: std::io::Result<bool>) -> Found {
    match r {
        Ok(true) => Found::Present,
        Ok(false) => Found::Absent,
        Err(e) => Found::Unknown(e.to_string()),
    }
}

/// Runs the probe of `f`.
fn probe_one(f: Feature) -> Found {
    let helper = |id| sys::probe_helper(PROG_SOCK_ADDR, ATTACH_INET4_CONNECT, id);
    match f {
        Feature::SockAddrHooks => {
            found(sys::probe_attach_type(PROG_SOCK_ADDR, ATTACH_INET4_CONNECT))
        }
        Feature::RecvmsgHooks => found(sys::probe_attach_type(PROG_SOCK_ADDR, ATTACH_UDP4_RECVMSG)),
        Feature::GetpeernameHooks => found(sys::probe_attach_type(
            PROG_SOCK_ADDR,
            ATTACH_INET4_GETPEERNAME,
        )),
        Feature::SetsockoptHook => found(sys::probe_attach_type(
            PROG_SOCKOPT,
            sys::ATTACH_CGROUP_SETSOCKOPT,
        )),
        Feature::CgroupLinks => found(sys::probe_link_create()),
        Feature::LinkUpdate => found(sys::probe_link_update()),
        Feature::NetnsCookieHelper => found(helper(HELPER_GET_NETNS_COOKIE)),
        Feature::SocketStorage => found(helper(HELPER_SK_STORAGE_GET).and_then(|a| {
            let b = sys::probe_helper(
                PROG_SOCKOPT,
                sys::ATTACH_CGROUP_SETSOCKOPT,
                HELPER_SK_STORAGE_GET,
            )?;
            Ok(a && b)
        })),
        Feature::CallerHelpers => found(
            helper(HELPER_GET_CURRENT_UID_GID)
                .and_then(|a| Ok(a && helper(HELPER_GET_CURRENT_COMM)?)),
        ),
        Feature::NetnsCookieSockopt => match crate::bpf::netns_cookie() {
            Ok(_) => Found::Present,
            Err(e) => match e
                .downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::raw_os_error)
            {
                Some(libc::ENOPROTOOPT) => Found::Absent,
                _ => Found::Unknown(format!("{e:#}")),
            },
        },
        Feature::SetRetval => found(helper(HELPER_SET_RETVAL)),
        Feature::SockDestroy => found(crate::apply::sockets::destroy_supported()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_feature_has_one_spec() {
        for s in SPECS {
            assert_eq!(SPECS.iter().filter(|t| t.feature == s.feature).count(), 1);
            assert_eq!(spec(s.feature).name, s.name);
        }
    }

    #[test]
    fn a_missing_required_feature_refuses_naming_it_and_its_version() {
        let f = Features::all("5.10.0-test").without(&[Feature::NetnsCookieSockopt]);
        let e = f.check().unwrap_err().to_string();
        assert!(e.contains("5.10.0-test"), "{e}");
        assert!(e.contains("SO_NETNS_COOKIE (Linux 5.14"), "{e}");
        assert!(!e.contains("bpf_set_retval"), "{e}");
    }

    #[test]
    fn probes_without_privilege_say_so_instead_of_blaming_the_kernel() {
        let mut found: BTreeMap<Feature, Found> =
            SPECS.iter().map(|s| (s.feature, Found::Present)).collect();
        for f in [Feature::SockAddrHooks, Feature::SetRetval] {
            found.insert(
                f,
                Found::Unknown("Operation not permitted (os error 1)".into()),
            );
        }
        let f = Features::from_found("6.18", found);
        assert!(f.denied());
        let e = f.check().unwrap_err().to_string();
        assert!(e.contains("must run as root"), "{e}");
        assert!(!e.contains("lacks"), "{e}");
        let states = f.states();
        let st = states.iter().find(|s| s.name == "bpf_set_retval").unwrap();
        assert_eq!(st.state, "unknown");
    }

    #[test]
    fn a_probe_that_failed_refuses_with_its_error() {
        let mut found: BTreeMap<Feature, Found> =
            SPECS.iter().map(|s| (s.feature, Found::Present)).collect();
        found.insert(
            Feature::CgroupLinks,
            Found::Unknown("Bad address (os error 14)".into()),
        );
        let e = Features::from_found("6.1", found)
            .check()
            .unwrap_err()
            .to_string();
        assert!(e.contains("the probe failed: Bad address"), "{e}");
    }

    #[test]
    fn degradable_features_start_and_say_what_is_lost() {
        let f = Features::all("5.15").without(&[Feature::SetRetval, Feature::SockDestroy]);
        f.check().unwrap();
        let states = f.states();
        let st = |name: &str| states.iter().find(|s| s.name == name).unwrap().clone();
        assert_eq!(st("bpf_set_retval").state, "degraded");
        assert!(st("bpf_set_retval").effect.contains("no port reservation"));
        assert_eq!(st("socket destruction (SOCK_DESTROY)").state, "degraded");
        assert_eq!(st("SO_NETNS_COOKIE").state, "active");
        assert!(st("SO_NETNS_COOKIE").effect.is_empty());
    }
}
