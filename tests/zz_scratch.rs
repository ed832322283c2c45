#![cfg(feature = "registry")]
#[path = "common/registry.rs"]
mod harness;
mod support;

use harness::{Comp, Fault, FaultProxy, Layout, RegistryConfig, RegistryServer};
use rootfs_cache::{Credential, Error, FetchObserver, ImageFetcher, Registry, RegistryOptions};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Default)]
struct Obs(Mutex<Vec<String>>);
impl FetchObserver for Obs {
    fn retry(&self, h: &str, r: &str) {
        self.0.lock().unwrap().push(format!("retry {h} {r}"))
    }
    fn resumed(&self, h: &str, o: u64) {
        self.0.lock().unwrap().push(format!("resumed {h} {o}"))
    }
    fn fallback(&self, h: &str, r: &str) {
        self.0.lock().unwrap().push(format!("fallback {h} {r}"))
    }
}

fn layout(dir: &std::path::Path) -> (Layout, harness::ImageInfo) {
    let mut l = Layout::create(dir);
    let tars = harness::image_layers(7, 300_000);
    let img = l.add_image(Some("mixed"), "amd64", &[(tars[0].clone(), Comp::Gzip), (tars[1].clone(), Comp::Zstd)]);
    let arm = l.add_image(Some("arm"), "arm64", &[(tars[2].clone(), Comp::Gzip)]);
    l.add_index("multi", &[&img, &arm]);
    (l, img)
}

fn read_all(r: &Registry, d: &rootfs_cache::Descriptor, obs: Arc<Obs>) -> Result<Vec<u8>, std::io::Error> {
    let mut b = r.open_blob_observed(d, obs).map_err(std::io::Error::other)?;
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut b, &mut v)?;
    Ok(v)
}

fn opts() -> RegistryOptions {
    RegistryOptions::default()
        .with_auth_files(false)
        .with_read_timeout(Duration::from_millis(500))
        .with_max_retry_time(Duration::from_secs(10))
}

#[test]
fn scratch_all() {
    let t = support::tempdir();
    let (l, img) = layout(&t.path().join("L"));
    // --- htpasswd + TLS with ca in hosts.toml
    let reg = RegistryServer::start(RegistryConfig::plain().htpasswd("alice", "s3cret").tls());
    reg.push(&l.dir, "multi", "a/multi", "v1", reg.creds().as_deref(), &[]);
    let hd = harness::HostsDir::new(&t.path().join("hosts"));
    let host = reg.host();
    // without ca: fails TLS
    let r = Registry::new(opts().with_credential(host.clone(), Credential::basic("alice", "s3cret"))).unwrap();
    let e = r.resolve(&format!("{host}/a/multi:v1")).unwrap_err();
    eprintln!("no-ca: {e}");
    hd.write(
        &host,
        &harness::hosts_toml(Some(&format!("https://{host}")), &[])
            .replace("server", &format!("ca = \"{}\"\nserver", reg.ca_path().unwrap().display())),
    );
    eprintln!("{}", std::fs::read_to_string(hd.dir.join(&host).join("hosts.toml")).unwrap());
    let r = Registry::new(
        opts().with_hosts_dir(&hd.dir).with_credential(host.clone(), Credential::basic("alice", "s3cret")),
    )
    .unwrap();
    let m = r.resolve(&format!("{host}/a/multi:v1")).unwrap();
    assert_eq!(m.digest.to_string(), img.manifest.digest);
    let obs = Arc::new(Obs::default());
    for d in &m.layers {
        assert_eq!(support::sha256_digest(&read_all(&r, d, obs.clone()).unwrap()), d.digest.to_string());
    }
    // wrong password
    let r =
        Registry::new(opts().with_hosts_dir(&hd.dir).with_credential(host.clone(), Credential::basic("alice", "nope")))
            .unwrap();
    eprintln!("wrong pw: {}", r.resolve(&format!("{host}/a/multi:v1")).unwrap_err());
    let r = Registry::new(opts().with_hosts_dir(&hd.dir)).unwrap();
    eprintln!("no creds: {}", r.resolve(&format!("{host}/a/multi:v1")).unwrap_err());

    // --- token auth
    let tokens = harness::TokenServer::start(harness::TokenPolicy {
        creds: Some(("bob".into(), "hunter2".into())),
        ..Default::default()
    });
    let treg = RegistryServer::start(RegistryConfig::plain().token(tokens.registry_config()));
    treg.push(&l.dir, "mixed", "tok/mixed", "v1", Some("bob:hunter2"), &[]);
    let r = Registry::new(opts().with_credential(treg.host(), Credential::basic("bob", "hunter2"))).unwrap();
    let m = r.resolve(&format!("{}/tok/mixed:v1", treg.host())).unwrap();
    for d in &m.layers {
        read_all(&r, d, obs.clone()).unwrap();
    }
    eprintln!("token requests: {}", tokens.request_count());
    let r = Registry::new(opts()).unwrap();
    eprintln!("token no creds: {}", r.resolve(&format!("{}/tok/mixed:v1", treg.host())).unwrap_err());

    // --- faults through proxy, plain registry
    let preg = RegistryServer::start(RegistryConfig::plain());
    preg.push(&l.dir, "mixed", "p/mixed", "v1", None, &[]);
    let proxy = FaultProxy::start(preg.addr());
    let reference = format!("{}/p/mixed:v1", proxy.host());
    let r = Registry::new(opts()).unwrap();
    let m = r.resolve(&reference).unwrap();
    let big = m.layers.iter().max_by_key(|d| d.size).unwrap().clone();
    let check = |name: &str, fault: Fault, times: usize| {
        proxy.on_get(&big.digest.to_string(), fault, Some(times));
        let obs = Arc::new(Obs::default());
        let start = std::time::Instant::now();
        let res = read_all(&r, &big, obs.clone());
        eprintln!(
            "{name}: {:?} in {:?} events {:?}",
            res.as_ref().map(|v| support::sha256_digest(v) == big.digest.to_string()).map_err(|e| e.to_string()),
            start.elapsed(),
            obs.0.lock().unwrap()
        );
        proxy.clear();
    };
    check("cut", Fault::CutAfter(100_000), 2);
    check("503", Fault::Status(503, vec![]), 2);
    check("429", Fault::Status(429, vec![("Retry-After".into(), "1".into())]), 1);
    check("ignore range + cut", Fault::CutAfter(50_000), 1);
    proxy.on_get(&big.digest.to_string(), Fault::CutAfter(50_000), Some(1));
    proxy.add(harness::Rule {
        method: Some("GET".into()),
        path_contains: big.digest.to_string(),
        fault: Fault::IgnoreRange,
        times: Some(1),
    });
    check("cut then ignore range", Fault::IgnoreRange, 0);
    check("stall", Fault::Stall { after: 1000, pause: Duration::from_secs(2) }, 1);
    check("corrupt", Fault::Corrupt(5000), 1);
    check("404 forever", Fault::Status(404, vec![]), 100);
    check("500 forever", Fault::Status(500, vec![]), 100);
    // redirect to other host: Authorization stripped
    let store = FaultProxy::start_on([127, 0, 0, 2], preg.addr(), None);
    check("redirect", Fault::Redirect(store.url()), 1);
    eprintln!(
        "store saw: {:?}",
        store
            .requests()
            .iter()
            .map(|q| (q.path().to_string(), q.header("authorization").map(str::to_string)))
            .collect::<Vec<_>>()
    );

    // --- mirrors: dead mirror, corrupt mirror, then upstream
    let mirror = FaultProxy::start(preg.addr());
    let dead = harness::dead_addr();
    let hd2 = harness::HostsDir::new(&t.path().join("hosts2"));
    hd2.write(
        &proxy.host(),
        &harness::hosts_toml(
            None,
            &[
                harness::HostEntry::new(format!("http://{dead}")),
                harness::HostEntry::new(format!("http://{}", mirror.host())),
            ],
        ),
    );
    let r = Registry::new(opts().with_hosts_dir(&hd2.dir)).unwrap();
    let obs = Arc::new(Obs::default());
    let m = r.resolve_observed(&reference, obs.as_ref()).unwrap();
    eprintln!(
        "mirror resolve events {:?}; mirror saw {:?}",
        obs.0.lock().unwrap(),
        mirror.requests().iter().map(|q| q.path().to_string()).collect::<Vec<_>>()
    );
    mirror.on_get(&big.digest.to_string(), Fault::Corrupt(10), None);
    let res = read_all(&r, &big, obs.clone());
    eprintln!("corrupt mirror 1st: {:?}", res.map(|v| v.len()).map_err(|e| e.to_string()));
    let res = read_all(&r, &big, obs.clone());
    eprintln!(
        "corrupt mirror 2nd: {:?} events {:?}",
        res.map(|v| support::sha256_digest(&v) == big.digest.to_string()).map_err(|e| e.to_string()),
        obs.0.lock().unwrap()
    );
    let _ = m;
    // all hosts failing
    proxy.set_refusing(true);
    mirror.set_refusing(true);
    let r = Registry::new(opts().with_hosts_dir(&hd2.dir).with_max_retries(1)).unwrap();
    eprintln!("all fail: {}", r.resolve(&reference).unwrap_err());
    panic!("show output");
}
