"""What the engine set up once (hosts_enrolled, a checkpoint): it works in every session,
whether the fixture ran now or its saved state was restored."""


def test_engine_reaches_every_enrolled_host_with_its_key(hosts_enrolled, ansible_engine):
    for host in hosts_enrolled["hosts"]:  # by name, against the host key the engine pinned
        name = ansible_engine.shell(f"ssh -i /root/.ssh/engine_id_ed25519 -o StrictHostKeyChecking=yes "
                                    f"-o BatchMode=yes {host} hostname")["stdout"]
        assert name == host


def test_hosts_read_the_engines_service(hosts_enrolled, ansible_host0):
    body = ansible_host0.shell(f"python3 -c 'import urllib.request; print(urllib.request.urlopen("
                               f"\"{hosts_enrolled['url']}\", timeout=30).read().decode())'")["stdout"]
    assert body.split() == hosts_enrolled["hosts"]
