//! The Kubernetes manifests in deploy/kubernetes/ agree with the binary:
//! ports, probes, grace period, the mounted configuration (which must load),
//! the secrets it needs, and the labels that tie the objects together.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use provider_gateway_server::config::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_HTTP_LISTEN, DEFAULT_LISTEN, DEFAULT_SHUTDOWN_GRACE_MS,
};
use provider_gateway_server::{Config, Registry};
use yaml_rust2::{Yaml, YamlLoader};

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("server/ sits in the workspace root")
        .join("deploy/kubernetes")
}

/// Every document of every `*.yaml` file, by file name.
fn manifests() -> BTreeMap<String, Vec<Yaml>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(manifest_dir()).expect("deploy/kubernetes/ exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        files.insert(name, docs);
    }
    files
}

/// The one object of `kind` among the manifests.
fn object(files: &BTreeMap<String, Vec<Yaml>>, kind: &str) -> Yaml {
    let found: Vec<&Yaml> = files
        .values()
        .flatten()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0].clone()
}

fn port_of(addr: &str) -> i64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {y:?}"))
}

fn int_of(y: &Yaml, what: &str) -> i64 {
    y.as_i64()
        .unwrap_or_else(|| panic!("{what}: expected an integer, got {y:?}"))
}

fn list_of<'a>(y: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    y.as_vec()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {y:?}"))
}

/// A label map as pairs.
fn labels(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .unwrap_or_else(|| panic!("expected a label map, got {y:?}"))
        .iter()
        .map(|(k, v)| {
            (
                str_of(k, "label").to_string(),
                str_of(v, "label").to_string(),
            )
        })
        .collect()
}

/// The gateway's container in the Deployment.
fn container(deployment: &Yaml) -> Yaml {
    let containers = list_of(
        &deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    );
    assert_eq!(containers.len(), 1, "one container");
    containers[0].clone()
}

/// The container's ports by name.
fn container_ports(container: &Yaml) -> HashMap<String, i64> {
    list_of(&container["ports"], "ports")
        .iter()
        .map(|p| {
            (
                str_of(&p["name"], "port name").to_string(),
                int_of(&p["containerPort"], "containerPort"),
            )
        })
        .collect()
}

/// The container's environment: plain values, and secret references as
/// `secret:<name>/<key>`.
fn container_env(container: &Yaml) -> HashMap<String, String> {
    list_of(&container["env"], "env")
        .iter()
        .map(|e| {
            let name = str_of(&e["name"], "env name").to_string();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else {
                let r = &e["valueFrom"]["secretKeyRef"];
                format!(
                    "secret:{}/{}",
                    str_of(&r["name"], "secretKeyRef.name"),
                    str_of(&r["key"], "secretKeyRef.key")
                )
            };
            (name, value)
        })
        .collect()
}

/// The gateway TOML held by the ConfigMap.
fn config_toml(files: &BTreeMap<String, Vec<Yaml>>) -> String {
    let config_map = object(files, "ConfigMap");
    str_of(
        &config_map["data"]["gateway.toml"],
        "ConfigMap data gateway.toml",
    )
    .to_string()
}

#[test]
fn deploy_manifests_parse_and_kustomization_lists_them() {
    let files = manifests();
    for (name, docs) in &files {
        assert!(!docs.is_empty(), "{name} holds no document");
        for doc in docs {
            assert!(doc["apiVersion"].as_str().is_some(), "{name}: apiVersion");
            assert!(doc["kind"].as_str().is_some(), "{name}: kind");
        }
    }
    let kustomization = object(&files, "Kustomization");
    let listed: Vec<&str> = list_of(&kustomization["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    for name in files.keys() {
        let should_list = name != "kustomization.yaml" && name != "secret.example.yaml";
        assert_eq!(
            listed.contains(&name.as_str()),
            should_list,
            "kustomization.yaml resources {listed:?} and {name}"
        );
    }
    assert_eq!(
        object(&files, "HorizontalPodAutoscaler")["apiVersion"].as_str(),
        Some("autoscaling/v2")
    );
    assert_eq!(
        object(&files, "PodDisruptionBudget")["apiVersion"].as_str(),
        Some("policy/v1")
    );
}

#[test]
fn deploy_ports_and_probes_match_the_binary_defaults() {
    let files = manifests();
    let deployment = object(&files, "Deployment");
    let c = container(&deployment);
    let grpc_port = port_of(DEFAULT_LISTEN);
    let admin_port = port_of(DEFAULT_ADMIN_LISTEN);
    let http_port = port_of(DEFAULT_HTTP_LISTEN);

    let ports = container_ports(&c);
    assert_eq!(ports.get("grpc"), Some(&grpc_port), "{ports:?}");
    assert_eq!(ports.get("http"), Some(&http_port), "{ports:?}");
    assert_eq!(ports.get("admin"), Some(&admin_port), "{ports:?}");

    let readiness = &c["readinessProbe"]["grpc"];
    assert!(!readiness.is_badvalue(), "readiness is a gRPC health probe");
    assert_eq!(int_of(&readiness["port"], "readinessProbe"), grpc_port);
    // Liveness asks the admin port's /healthz, which stays up while a
    // draining pod's gRPC health reads NOT_SERVING.
    let liveness = &c["livenessProbe"]["httpGet"];
    assert_eq!(liveness["path"].as_str(), Some("/healthz"));
    assert_eq!(int_of(&liveness["port"], "livenessProbe"), admin_port);
    // Readiness asks about the whole server.
    assert_eq!(c["readinessProbe"]["grpc"]["service"].as_str(), Some(""));

    // The Service exposes the same ports, to the container's named ports.
    let service = object(&files, "Service");
    assert_eq!(service["spec"]["type"].as_str(), Some("ClusterIP"));
    let service_ports = list_of(&service["spec"]["ports"], "Service ports");
    for (name, expected) in [
        ("grpc", grpc_port),
        ("http", http_port),
        ("admin", admin_port),
    ] {
        let p = service_ports
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("Service port {name}"));
        assert_eq!(int_of(&p["port"], "port"), expected, "Service port {name}");
        let target = match &p["targetPort"] {
            Yaml::Integer(n) => *n,
            Yaml::String(s) => *ports
                .get(s)
                .unwrap_or_else(|| panic!("targetPort {s} names no container port")),
            other => panic!("targetPort {other:?}"),
        };
        assert_eq!(target, expected, "Service port {name} target");
    }
    let grpc = service_ports
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .unwrap();
    assert_eq!(grpc["appProtocol"].as_str(), Some("grpc"));
}

#[test]
fn deploy_grace_period_outlasts_the_gateways_drain() {
    let files = manifests();
    let deployment = object(&files, "Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let grace_ms = int_of(&spec["terminationGracePeriodSeconds"], "grace") as u64 * 1000;
    // The preStop pause runs inside the same grace period.
    let pre_stop_ms = match list_of(
        &container(&deployment)["lifecycle"]["preStop"]["exec"]["command"],
        "preStop command",
    )
    .as_slice()
    {
        [sleep, seconds] if sleep.as_str() == Some("sleep") => {
            str_of(seconds, "sleep").parse::<u64>().unwrap() * 1000
        }
        other => panic!("preStop: {other:?}"),
    };
    // The drain the mounted configuration asks for (the default unless it
    // sets `shutdown_grace_ms`).
    let config = Config::from_toml(&config_toml(&files)).unwrap();
    let drain_ms = config.shutdown_grace_ms;
    for drain_ms in [DEFAULT_SHUTDOWN_GRACE_MS, drain_ms] {
        assert!(
            grace_ms > drain_ms + pre_stop_ms,
            "terminationGracePeriodSeconds ({grace_ms} ms) must exceed the preStop pause \
             ({pre_stop_ms} ms) plus shutdown_grace_ms ({drain_ms} ms)"
        );
    }
}

#[test]
fn deploy_runs_non_root_with_a_read_only_root() {
    let files = manifests();
    let deployment = object(&files, "Deployment");
    let pod = &deployment["spec"]["template"]["spec"]["securityContext"];
    let sc = &container(&deployment)["securityContext"];
    assert_eq!(pod["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    let uid = int_of(&sc["runAsUser"], "runAsUser");
    assert!(uid > 0, "a numeric non-root UID: {uid}");
    assert_eq!(int_of(&pod["runAsUser"], "pod runAsUser"), uid);
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    let drop: Vec<&str> = list_of(&sc["capabilities"]["drop"], "drop")
        .iter()
        .map(|c| str_of(c, "capability"))
        .collect();
    assert_eq!(drop, ["ALL"]);

    // The Dockerfile's user is the same UID.
    let dockerfile = std::fs::read_to_string(manifest_dir().join("../../Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(&format!("USER {uid}")),
        "the Dockerfile runs as USER {uid}"
    );
}

#[test]
fn deploy_config_map_loads_and_is_what_the_container_reads() {
    let files = manifests();
    let toml = config_toml(&files);
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("ConfigMap gateway.toml: {e}"));
    assert_eq!(
        port_of(&config.listen),
        port_of(DEFAULT_LISTEN),
        "the ConfigMap's listen port"
    );
    assert_eq!(
        port_of(&config.telemetry.admin_listen),
        port_of(DEFAULT_ADMIN_LISTEN),
        "the ConfigMap's admin port"
    );
    assert_eq!(
        port_of(&config.http_listen),
        port_of(DEFAULT_HTTP_LISTEN),
        "the ConfigMap's HTTP ingress port"
    );

    // GATEWAY_CONFIG names the file where the ConfigMap is mounted.
    let deployment = object(&files, "Deployment");
    let c = container(&deployment);
    let env = container_env(&c);
    let path = env.get("GATEWAY_CONFIG").expect("GATEWAY_CONFIG is set");
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = list_of(&c["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(dir))
        .unwrap_or_else(|| panic!("nothing is mounted at {dir}"));
    let volume_name = str_of(&mount["name"], "mount name");
    let volume = list_of(
        &deployment["spec"]["template"]["spec"]["volumes"],
        "volumes",
    )
    .iter()
    .find(|v| v["name"].as_str() == Some(volume_name))
    .unwrap()
    .clone();
    let config_map = object(&files, "ConfigMap");
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        config_map["metadata"]["name"].as_str(),
        "the mounted ConfigMap"
    );
    let items = volume["configMap"]["items"].as_vec();
    let key = match items {
        Some(items) => str_of(
            &items
                .iter()
                .find(|i| i["path"].as_str() == Some(file))
                .unwrap_or_else(|| panic!("no ConfigMap item is mounted as {file}"))["key"],
            "item key",
        ),
        None => file,
    };
    assert!(
        !config_map["data"][key].is_badvalue(),
        "ConfigMap key {key}"
    );

    // Every provider's key variable comes from the Secret, whose example
    // holds each key; with them the providers build, as `--check-config`
    // would check.
    let secret = object(&files, "Secret");
    let secret_name = str_of(&secret["metadata"]["name"], "Secret name");
    let table: toml::Table = toml.parse().unwrap();
    let providers = table["providers"].as_table().expect("[providers]");
    let mut pod_env = HashMap::new();
    for (name, section) in providers {
        let Some(var) = section.get("api_key_env").and_then(|v| v.as_str()) else {
            continue;
        };
        let from = env
            .get(var)
            .unwrap_or_else(|| panic!("providers.{name}: the container does not set {var}"));
        assert_eq!(from, &format!("secret:{secret_name}/{var}"), "{var}");
        assert!(
            !secret["stringData"][var].is_badvalue(),
            "secret.example.yaml holds {var}"
        );
        pod_env.insert(var.to_string(), "dummy-key".to_string());
    }
    Registry::from_config(&config, &pod_env)
        .unwrap_or_else(|e| panic!("the ConfigMap's providers do not build: {e}"));
}

#[test]
fn deploy_objects_select_the_gateways_pods() {
    let files = manifests();
    let deployment = object(&files, "Deployment");
    let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    let selects = |selector: &Yaml, what: &str| {
        let selector = labels(selector);
        assert!(!selector.is_empty(), "{what} selects something");
        for (k, v) in &selector {
            assert_eq!(pod_labels.get(k), Some(v), "{what} selector {k}");
        }
    };
    selects(&deployment["spec"]["selector"]["matchLabels"], "Deployment");
    selects(&object(&files, "Service")["spec"]["selector"], "Service");
    selects(
        &object(&files, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        "PodDisruptionBudget",
    );
    let hpa = object(&files, "HorizontalPodAutoscaler");
    let target = &hpa["spec"]["scaleTargetRef"];
    assert_eq!(target["kind"].as_str(), Some("Deployment"));
    assert_eq!(
        target["name"].as_str(),
        deployment["metadata"]["name"].as_str()
    );
    assert!(int_of(&hpa["spec"]["minReplicas"], "minReplicas") >= 2);
    let metric = &list_of(&hpa["spec"]["metrics"], "metrics")[0];
    assert_eq!(metric["resource"]["name"].as_str(), Some("cpu"));
    // Utilization is relative to the request, so there must be one.
    assert!(
        !container(&deployment)["resources"]["requests"]["cpu"].is_badvalue(),
        "a CPU request"
    );
    assert!(
        !container(&deployment)["resources"]["limits"]["memory"].is_badvalue(),
        "a memory limit"
    );
}

#[test]
fn deploy_turns_service_links_off() {
    // Kubernetes would put GATEWAY_SERVICE_HOST, GATEWAY_PORT=tcp://... into
    // the pod for a Service named `gateway`, where the gateway reads
    // GATEWAY_* as configuration.
    let files = manifests();
    let deployment = object(&files, "Deployment");
    assert_eq!(
        deployment["spec"]["template"]["spec"]["enableServiceLinks"].as_bool(),
        Some(false)
    );
}
