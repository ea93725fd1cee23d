//! Frontends written at `network connect`, from the bindings a container was created with,
//! before Docker's start completes; never for a port another container publishes.

use super::*;

/// `docker create` of an httpd publishing `publish`; removed on drop.
fn create(name: &str, publish: &str) -> Container {
    let name = format!("dpe2e-{}-{name}", std::process::id());
    let _ = cmd(&["docker", "rm", "-f", &name]);
    sh(&[
        "docker",
        "create",
        "--name",
        &name,
        "--label",
        "dataplane.test=1",
        "-p",
        publish,
        &image(),
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    Container { name }
}

/// Microseconds between Docker's `network connect` of container `c` (on any network) and
/// its `start` event, from Docker's own event times.
fn connect_to_start_us(c: &Container, since: &str) -> i64 {
    let id = sh(&["docker", "inspect", "-f", "{{.Id}}", &c.name])
        .trim()
        .to_string();
    let until = sh(&["date", "+%s"]).trim().parse::<u64>().unwrap() + 1;
    let text = sh(&[
        "docker",
        "events",
        "--since",
        since,
        "--until",
        &until.to_string(),
        "--format",
        "{{.Type}} {{.Action}} {{.TimeNano}} {{.Actor.ID}} {{index .Actor.Attributes \"container\"}}",
    ]);
    let time_of = |typ: &str, action: &str| {
        text.lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let ours = f.get(3) == Some(&id.as_str()) || f.get(4) == Some(&id.as_str());
                (f.first() == Some(&typ) && f.get(1) == Some(&action) && ours)
                    .then(|| f.get(2)?.parse::<i64>().ok())
                    .flatten()
            })
            .unwrap_or_else(|| panic!("no {typ} {action} event of {}: {text}", c.name))
    };
    (time_of("container", "start") - time_of("network", "connect")) / 1000
}

#[test]
#[ignore = "needs root and a Docker engine: run by `cargo xtask test`"]
fn frontends_are_in_place_before_dockers_start_completes() {
    let (p, q) = (port(63), port(56));
    let agent = Agent::start("early");
    let early = |agent: &Agent| agent.status().early_lead_us;

    // Created, then started: the frontends are written at its `network connect`, which
    // Docker sends 15-40 ms before its start event (29.7 here); the agent writes 10-15 ms
    // after the connect, so usually before the start event, not always.
    let web = create("early", &format!("{p}:80"));
    // The agent inspects a created container in the background.
    std::thread::sleep(Duration::from_millis(500));
    let since = sh(&["date", "+%s"]).trim().to_string();
    sh(&["docker", "start", &web.name]);
    wait_until("the start to be synced", Duration::from_secs(10), || {
        !early(&agent).is_empty()
    });
    let leads = early(&agent);
    assert_eq!(leads.len(), 1, "{leads:?}");
    let gap_us = connect_to_start_us(&web, &since);
    eprintln!(
        "early: written {} µs before Docker's start event; Docker's connect to start: {gap_us} µs",
        leads[0]
    );
    // Written at most 50 ms after Docker's connect event (so before its start event where
    // they are further apart than that).
    assert!(
        gap_us - leads[0] < 50_000,
        "written {} µs before the start event, which came {gap_us} µs after the connect",
        leads[0]
    );
    // The inspect after the start replaced them with what Docker published: the same.
    wait_http("the backend", p, Duration::from_secs(10));
    let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
    assert_eq!(kernel_peer(&s), format!("{}:80", web.ip()));
    drop(s);
    assert_eq!(
        agent
            .frontends()
            .iter()
            .filter(|f| f.container == web.name)
            .count(),
        2
    );

    // A second container created for the same port: Docker refuses to start it, and no
    // early frontend of it ever takes the port from the first.
    let thief = create("early-thief", &format!("{p}:80"));
    std::thread::sleep(Duration::from_millis(500));
    let started = cmd(&["docker", "start", &thief.name]);
    assert!(
        !started.status.success(),
        "Docker started a second container on {p}"
    );
    for _ in 0..20 {
        let s = TcpStream::connect(("127.0.0.1", p)).unwrap();
        assert_eq!(kernel_peer(&s), format!("{}:80", web.ip()));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(agent.frontends().iter().all(|f| f.container != thief.name));
    assert_eq!(early(&agent).len(), 1);

    // A port Docker picks at the start (`-p 80`) cannot be known early: the start event
    // serves, as before.
    let any = create("early-any", "80");
    std::thread::sleep(Duration::from_millis(500));
    sh(&["docker", "start", &any.name]);
    wait_until(
        "the picked port's frontend",
        Duration::from_secs(10),
        || agent.frontends().iter().any(|f| f.container == any.name),
    );
    assert_eq!(early(&agent).len(), 1);
    drop(any);

    // A container stopped before it ever started leaves nothing behind.
    let never = create("early-never", &format!("{q}:80"));
    std::thread::sleep(Duration::from_millis(300));
    drop(never);
    std::thread::sleep(Duration::from_millis(300));
    assert!(agent.frontend(&format!("0.0.0.0:{q}/tcp")).is_none());
}
