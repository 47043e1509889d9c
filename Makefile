.PHONY: demo test images bench scale k8s-bench dns-bench controller-bench hostile k6 soak fanout

# Quick start: gateway + demo upstream on the bundled example sandboxes.
demo:
	scripts/demo.sh

# Every check and test (installs what it needs).
test:
	scripts/test.sh

# The three container images (buildah, FROM scratch), smoke-run with runc.
images:
	scripts/images.sh
	scripts/image-smoke.sh

# Gateway vs nginx vs direct on loopback; prints a table and a verdict. BASE=<git revision> adds
# the gateway as built at that revision, with a before/after verdict.
bench:
	BASE=$(BASE) loadtest/run.sh

# Route-table memory and time to ready at 100,000 sandboxes.
scale:
	loadtest/scale.sh

# Kubernetes provider: route propagation latency and 100,000-object scale against a real API server.
k8s-bench:
	loadtest/k8s.sh

# Egress sidecar: DNS latency and q/s through the proxy vs dnsmasq directly, policy evaluation cost.
dns-bench:
	loadtest/dns.sh

# BatchSandbox controller vs the reference controller: create → pod, pod Ready → endpoints, CPU.
controller-bench:
	loadtest/controller.sh

# The hostile-client suite in its full form (the test command runs a short one); prints a table.
hostile:
	HOSTILE_FULL=1 cargo test -p gateway --test hostile -- --nocapture

# The k6 scenarios in their full form (the test command runs the short one); prints a table.
k6:
	loadtest/k6.sh full

# Ten minutes of mixed k6 traffic (1,000/s over 10,000 sandboxes): no failed request, gateway RSS
# growth under 5% (K6_RATE, K6_DURATION override).
soak:
	loadtest/k6.sh soak

# Many gateways on one API server: API server CPU per gateway sync, paged vs streaming lists.
fanout:
	loadtest/k8s.sh fanout
