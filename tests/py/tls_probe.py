"""Opens one TLS connection the way a peer proxy would and reports the server certificate.

  tls_probe.py HOST PORT SNI CA CERT KEY EXPECT_PEM
prints {"ok": true, "match": <served leaf == first cert in EXPECT_PEM>} or {"ok": false, "error": ...}
"""
import json
import socket
import ssl
import sys

host, port, sni, ca, cert, key, expect = sys.argv[1:8]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.minimum_version = ssl.TLSVersion.TLSv1_3
ctx.load_verify_locations(ca)
ctx.load_cert_chain(cert, key)
ctx.check_hostname = True
try:
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            served = s.getpeercert(binary_form=True)
    with open(expect) as f:
        pem = f.read()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    print(json.dumps({"ok": True, "match": ssl.PEM_cert_to_DER_cert(first) == served}))
except Exception as e:  # noqa: BLE001 - report any failure to the test
    print(json.dumps({"ok": False, "error": str(e)}))
