"""Site operator: make this site's SuperNode key pair (ECDSA P-384, OpenSSH format).

    python deploy/make_site_key.py --out keys --name hospital-a

Keep keys/hospital-a.key at the site (flower-supernode --auth-supernode-private-key); send
keys/hospital-a.pub to the federation operator, who admits it with
``flwr supernode register keys/hospital-a.pub CONNECTION``. See deploy/OPERATORS.md.
"""

import argparse

from server.tls import make_node_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", required=True, help="a name for this site's SuperNode")
    args = parser.parse_args()
    private, public = make_node_key(args.out, args.name)
    print(f"private key (stays here): {private}\npublic key (send to the operator): {public}")


if __name__ == "__main__":
    main()
