#!/usr/bin/env python3
"""Keeps deploy/ valid: every Kubernetes manifest parses and has the fields it needs, the systemd
units have what systemd needs, the NATS configuration (cluster.conf + gen-auth.sh output, with and
without TLS) passes `nats-server -t`, the Prometheus configuration and rules pass promtool, and
the Grafana dashboard is well formed. Fast and needs no root: runs with the unit tests."""
import configparser
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
NAMESPACED = {"ConfigMap", "Service", "StatefulSet", "Deployment", "DaemonSet", "Secret"}
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}


def manifests():
    out = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        if os.path.basename(path) == "kustomization.yaml":
            continue
        with open(path) as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    out.append((os.path.basename(path), doc))
    return out


def by_kind(kind):
    return [d for _, d in manifests() if d["kind"] == kind]


def pod_spec(doc):
    return doc["spec"]["template"]["spec"]


class KubernetesManifests(unittest.TestCase):
    def test_every_document_has_identity(self):
        docs = manifests()
        self.assertGreaterEqual(len(docs), 9)
        for name, d in docs:
            with self.subTest(file=name, kind=d.get("kind")):
                self.assertIn("apiVersion", d)
                self.assertIn("kind", d)
                self.assertTrue(d["metadata"]["name"])
                if d["kind"] in NAMESPACED:
                    self.assertEqual(d["metadata"].get("namespace"), "cvm-system")

    def test_kustomization_lists_every_file(self):
        with open(os.path.join(K8S, "kustomization.yaml")) as f:
            listed = set(yaml.safe_load(f)["resources"])
        files = {os.path.basename(p) for p in glob.glob(os.path.join(K8S, "*.yaml"))} - {"kustomization.yaml"}
        self.assertEqual(listed, files)

    def test_workloads_are_consistent(self):
        for d in (d for _, d in manifests() if d["kind"] in WORKLOADS):
            with self.subTest(workload=d["metadata"]["name"]):
                selector = d["spec"]["selector"]["matchLabels"]
                labels = d["spec"]["template"]["metadata"]["labels"]
                self.assertTrue(selector.items() <= labels.items(), "selector must match the pod labels")
                spec = pod_spec(d)
                volumes = {v["name"] for v in spec.get("volumes", [])}
                claims = {c["metadata"]["name"] for c in d["spec"].get("volumeClaimTemplates", [])}
                for c in spec["containers"]:
                    self.assertTrue(c["name"])
                    self.assertTrue(c["image"])
                    self.assertTrue(c.get("command") or c.get("args"))
                    for m in c.get("volumeMounts", []):
                        self.assertIn(m["name"], volumes | claims, "mount of an undefined volume")
                        self.assertTrue(m["mountPath"].startswith("/"))
                    for p in c.get("ports", []):
                        self.assertIsInstance(p["containerPort"], int)

    def test_services_read_nats_url_and_credentials(self):
        for d in by_kind("Deployment") + by_kind("DaemonSet"):
            if d["metadata"]["name"] == "cvm-lxcfs":
                continue  # a node service, no NATS client
            with self.subTest(workload=d["metadata"]["name"]):
                c = pod_spec(d)["containers"][0]
                env = {e["name"]: e for e in c.get("env", [])}
                self.assertIn("CVM_NATS_URL", env)
                self.assertEqual(env["CVM_NATS_URL"]["value"].count("nats://"), 3, "all three NATS servers")
                secret_env = any("secretRef" in e for e in c.get("envFrom", []))
                secret_volume = any("secret" in v for v in pod_spec(d).get("volumes", []))
                self.assertTrue(secret_env or secret_volume, "a NATS user of its own")

    def test_scheduler_and_broker_are_replicated_deployments(self):
        names = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
        for name in ["cvm-scheduler", "cvm-gpu-broker"]:
            self.assertIn(name, names)
            self.assertGreaterEqual(names[name]["spec"]["replicas"], 2)
            self.assertFalse(pod_spec(names[name])["containers"][0]["securityContext"]["allowPrivilegeEscalation"])

    def test_node_agent_daemonset_has_host_paths_and_privileges(self):
        (ds,) = [d for d in by_kind("DaemonSet") if d["metadata"]["name"] == "cvm-node-agent"]
        spec = pod_spec(ds)
        self.assertTrue(spec["hostPID"])
        self.assertTrue(spec["hostNetwork"], "the workspaces' bridge and NAT are the node's")
        c = spec["containers"][0]
        self.assertTrue(c["securityContext"]["privileged"])
        host_paths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
        for path in ["/usr/src", "/lib/modules", "/var/run", "/var/lib", "/sys/fs/cgroup"]:
            self.assertIn(path, host_paths)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        self.assertTrue(mounts["lib-modules"]["readOnly"])
        self.assertTrue(mounts["usr-src"]["readOnly"])
        env = {e["name"]: e for e in c["env"]}
        self.assertEqual(env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName")
        self.assertIn('--node-id "$NODE_NAME"', " ".join(c["args"]))
        (rc,) = by_kind("RuntimeClass")
        self.assertEqual(spec["nodeSelector"], rc["scheduling"]["nodeSelector"])

    def test_lxcfs_daemonset_shares_its_mount_with_the_agent(self):
        (ds,) = [d for d in by_kind("DaemonSet") if d["metadata"]["name"] == "cvm-lxcfs"]
        spec = pod_spec(ds)
        self.assertTrue(spec["hostPID"], "lxcfs reads each reader's cgroup by its host pid")
        c = spec["containers"][0]
        self.assertIn("/var/lib/lxcfs", " ".join(c["args"]))
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        self.assertEqual(mounts["/var/lib/lxcfs"]["mountPropagation"], "Bidirectional")
        (agent,) = [d for d in by_kind("DaemonSet") if d["metadata"]["name"] == "cvm-node-agent"]
        agent_mounts = {m["mountPath"]: m for m in pod_spec(agent)["containers"][0]["volumeMounts"]}
        self.assertIn(agent_mounts["/var/lib"].get("mountPropagation"), ("Bidirectional", "HostToContainer"))
        (rc,) = by_kind("RuntimeClass")
        self.assertEqual(spec["nodeSelector"], rc["scheduling"]["nodeSelector"])

    def test_runtime_class_is_sysbox(self):
        (rc,) = by_kind("RuntimeClass")
        self.assertEqual(rc["metadata"]["name"], "sysbox-runc")
        self.assertEqual(rc["handler"], "sysbox-runc")
        self.assertEqual(rc["apiVersion"], "node.k8s.io/v1")

    def test_nats_is_a_three_server_jetstream_cluster(self):
        (sts,) = by_kind("StatefulSet")
        self.assertEqual(sts["spec"]["replicas"], 3)
        (cm,) = by_kind("ConfigMap")
        conf = cm["data"]["cluster.conf"]
        self.assertIn("jetstream", conf)
        self.assertEqual(conf.count("nats-route://nats-"), 3)
        self.assertIn("include ./auth/auth.conf", conf)
        headless = [s for s in by_kind("Service") if s["metadata"]["name"] == sts["spec"]["serviceName"]]
        self.assertEqual(headless[0]["spec"]["clusterIP"], "None")
        # The ConfigMap's file is a valid nats-server configuration with gen-auth.sh's files beside it.
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([os.path.join(DEPLOY, "nats", "gen-auth.sh"), "--out", os.path.join(d, "auth"), "n1"],
                           check=True, capture_output=True)
            with open(os.path.join(d, "cluster.conf"), "w") as f:
                f.write(conf)
            r = subprocess.run(["nats-server", "-c", os.path.join(d, "cluster.conf"), "-t"], capture_output=True,
                               text=True, env=dict(os.environ, NATS_SERVER_NAME="nats-0"))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class NatsConfiguration(unittest.TestCase):
    ENV = {
        "NATS_SERVER_NAME": "nats-1", "NATS_LISTEN": "127.0.0.1:4222", "NATS_HTTP_LISTEN": "127.0.0.1:8222",
        "NATS_CLUSTER_LISTEN": "127.0.0.1:6222", "NATS_ROUTE_1": "nats-route://127.0.0.1:6222",
        "NATS_ROUTE_2": "nats-route://127.0.0.1:6223", "NATS_ROUTE_3": "nats-route://127.0.0.1:6224",
        "NATS_STORE_DIR": "/tmp/cvm-nats-check",
    }

    def generate(self, d, *extra):
        out = os.path.join(d, "conf")
        subprocess.run([os.path.join(DEPLOY, "nats", "gen-auth.sh"), "--out", out, *extra, "node-a", "node-b"],
                       check=True, capture_output=True)
        shutil.copy(os.path.join(DEPLOY, "nats", "cluster.conf"), out)
        return out

    def nats_check(self, out):
        return subprocess.run(["nats-server", "-c", os.path.join(out, "cluster.conf"), "-t"], capture_output=True,
                              text=True, env=dict(os.environ, **self.ENV))

    def test_cluster_conf_with_generated_users_is_valid(self):
        with tempfile.TemporaryDirectory() as d:
            out = self.generate(d)
            r = self.nats_check(out)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            with open(os.path.join(out, "auth.conf")) as f:
                auth = f.read()
            for user in ["scheduler", "gpu-broker", "exporter", "cvmctl", "agent-node-a", "agent-node-b"]:
                self.assertIn('user: "%s"' % user, auth)
            self.assertEqual(oct(os.stat(os.path.join(out, "auth.conf")).st_mode & 0o777), "0o600")
            self.assertNotIn("no_auth_user", auth, "anonymous access must stay off")
            # Passwords survive a re-run (adding a node must not rotate everyone).
            def scheduler_env():
                with open(os.path.join(out, "credentials", "scheduler.env")) as f:
                    return f.read()

            before = scheduler_env()
            subprocess.run([os.path.join(DEPLOY, "nats", "gen-auth.sh"), "--out", out, "node-a", "node-c"],
                           check=True, capture_output=True)
            self.assertEqual(scheduler_env(), before)

    def test_bad_node_ids_are_refused(self):
        with tempfile.TemporaryDirectory() as d:
            r = subprocess.run([os.path.join(DEPLOY, "nats", "gen-auth.sh"), "--out", d, "bad.node"],
                               capture_output=True, text=True)
            self.assertEqual(r.returncode, 2)
            self.assertIn("bad node id", r.stderr)

    @unittest.skipUnless(shutil.which("openssl"), "openssl missing")
    def test_tls_option_yields_a_valid_configuration(self):
        with tempfile.TemporaryDirectory() as d:
            cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                            "/CN=nats", "-keyout", key, "-out", cert], check=True, capture_output=True)
            out = self.generate(d, "--tls-cert", cert, "--tls-key", key, "--tls-ca", cert)
            with open(os.path.join(out, "tls.conf")) as f:
                self.assertIn("cert_file", f.read())
            r = self.nats_check(out)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class Systemd(unittest.TestCase):
    def test_units_have_what_systemd_needs(self):
        units = sorted(glob.glob(os.path.join(DEPLOY, "systemd", "*.service")))
        names = {os.path.basename(u) for u in units}
        for expected in ["cvm-scheduler.service", "cvm-gpu-broker.service", "cvm-node-agent.service",
                         "cvm-exporter.service", "cvm-nats.service"]:
            self.assertIn(expected, names)
        for path in units:
            with self.subTest(unit=os.path.basename(path)):
                p = configparser.ConfigParser(strict=False, interpolation=None)
                p.optionxform = str
                p.read(path)
                self.assertTrue(p["Unit"]["Description"])
                exec_start = p["Service"]["ExecStart"]
                self.assertTrue(exec_start.startswith("/"), "ExecStart needs an absolute path")
                self.assertIn("EnvironmentFile", p["Service"])
                self.assertEqual(p["Install"]["WantedBy"], "multi-user.target")
                binary = os.path.basename(exec_start.split()[0])
                if binary.startswith("cvm-"):
                    self.assertEqual(binary + ".service", os.path.basename(path))
                    self.assertIn("--metrics-listen", exec_start)


class Observability(unittest.TestCase):
    def test_prometheus_config_and_rules_pass_promtool(self):
        if not shutil.which("promtool"):
            self.skipTest("promtool missing")
        r = subprocess.run(["promtool", "check", "config", os.path.join(DEPLOY, "prometheus", "prometheus.yml")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        r = subprocess.run(["promtool", "check", "rules", os.path.join(DEPLOY, "prometheus", "alerts.yml")],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_alerts_cover_what_operators_asked_for(self):
        with open(os.path.join(DEPLOY, "prometheus", "alerts.yml")) as f:
            rules = [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
        names = {r["alert"] for r in rules}
        for n in ["CvmNodeLost", "CvmBuildsFailing", "CvmQueueBacklog", "CvmGpuUnhealthy", "CvmHeartbeatLag"]:
            self.assertIn(n, names)
        for r in rules:
            self.assertIn("severity", r["labels"])
            self.assertTrue(r["annotations"]["summary"])

    def test_dashboard_is_well_formed(self):
        with open(os.path.join(DEPLOY, "grafana", "cvm-dashboard.json")) as f:
            dash = json.load(f)
        self.assertEqual(dash["uid"], "cvm-control")
        ids = [p["id"] for p in dash["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
        # Builds, placement latency, nodes by capability and GPUs, as the issue asks.
        for metric in ["cvm_scheduler_builds_received_total", "cvm_scheduler_decision_seconds_bucket",
                       "cvm_cluster_nodes_with_capability", "cvm_cluster_gpus"]:
            self.assertIn(metric, exprs)
        for p in dash["panels"]:
            self.assertTrue(p["targets"], p["title"])
            for axis in ["h", "w", "x", "y"]:
                self.assertIn(axis, p["gridPos"])


if __name__ == "__main__":
    unittest.main()
