"""Federation operator: make the CA and the SuperLink's TLS certificate.

    python deploy/make_certs.py --out certs --host superlink.example.org [--host 10.0.0.5]

Writes certs/ca.crt (give it to every site), certs/ca.key (keep it offline), certs/superlink.crt and
certs/superlink.key (for flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile). See
deploy/OPERATORS.md.
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
    cert, key = make_server_cert(args.out, args.out, args.host)
    print(f"CA: {ca} (give to the sites)\nSuperLink certificate: {cert}\nSuperLink key: {key}")


if __name__ == "__main__":
    main()
