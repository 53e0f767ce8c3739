"""What real guests run: Debian's cloud-init readers, as a script for the system python3.

`READER_SCRIPT BASE_URL [MAC]` reads the whole instance with cloud-init's OpenStack reader
(`read_v2`, which also walks the EC2 tree) and its EC2 helpers, logs every request at DEBUG on
stderr, and prints what it read as one JSON document. MAC names the instance's interface for
`convert_net_json`.
"""

from __future__ import annotations

READER_SCRIPT = r"""
import json, logging, sys
from cloudinit.sources.helpers import ec2, openstack

logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s", force=True)
base = sys.argv[1]
mac = sys.argv[2] if len(sys.argv) > 2 else "fa:16:3e:11:22:33"

class Reader(openstack.MetadataReader):
    # The stock reader walks EC2 at 169.254.169.254 whatever its base: point it at ours.
    def _read_ec2_metadata(self):
        return ec2.get_instance_metadata(metadata_address=base, timeout=10, retries=0)

def text(value):
    return value.decode() if isinstance(value, bytes) else value

result = Reader(base, timeout=10, retries=0).read_v2()
md = result["metadata"]
network = openstack.convert_net_json(result["networkdata"],
                                     known_macs={mac: "eth0"})
ec2_md = ec2.get_instance_metadata(api_version="2009-04-04", metadata_address=base,
                                   timeout=10, retries=0)
ec2_ud = ec2.get_instance_userdata(api_version="2009-04-04", metadata_address=base,
                                   timeout=10, retries=0)
print(json.dumps({
    "uuid": md["uuid"], "instance-id": md.get("instance-id"), "hostname": md["hostname"],
    "local-hostname": md.get("local-hostname"), "public_keys": md.get("public_keys"),
    "random_seed_len": len(md["random_seed"]), "dsmode": result.get("dsmode"),
    "userdata": text(result["userdata"]), "vendordata": result["vendordata"],
    "vendordata2": result["vendordata2"], "network_config": network,
    "os_ec2": result["ec2-metadata"], "ec2": ec2_md, "ec2_userdata": text(ec2_ud),
}))
"""

# Markers of a failed request in cloud-init's url_helper log (successful reads log "Read from").
FAILURE_MARKERS = ("Failed", "Traceback", "Exception", "HTTP Error", "UrlError", "Retrying")
