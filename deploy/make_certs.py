"""Federation operator: make the CA and the SuperLink's TLS certificate.

    python deploy/make_certs.py --out certs --host superlink.example.org [--host 10.0.0.5]

Writes certs/ca.crt (give it to every site), certs/ca.key (keep it offline), certs/superlink.crt and
certs/superlink.key (for flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile, and the Fleet
gateway). The certificate is also valid for localhost and 127.0.0.1, where the gateway and the operator's
`flwr` commands reach the SuperLink itself. See deploy/OPERATORS.md.
"""

import argparse

from server.tls import make_ca, make_server_cert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the CA and the SuperLink certificate")
    parser.add_argument("--host", action="append", required=True,
                        help="a DNS name or IP address the sites use to reach the SuperLink (repeatable)")
    args = parser.parse_args()
    ca, _ = make_ca(args.out)
    loopback = [name for name in ("localhost", "127.0.0.1") if name not in args.host]
    cert, key = make_server_cert(args.out, args.out, [*args.host, *loopback])
    print(f"CA: {ca} (give to the sites)\nSuperLink certificate: {cert}\nSuperLink key: {key}")


if __name__ == "__main__":
    main()
