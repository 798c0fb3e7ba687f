#!/usr/bin/env sh
# Self-signed TLS material and SuperNode key pairs for docker/compose.tls.yml (for testing and
# small private deployments; use your organisation's CA for anything else).
#
#   ./generate.sh                      # CA + SuperLink certificate + keys for 2 SuperNodes
#   SUPERNODES=4 ./generate.sh         # keys for 4 SuperNodes
#   EXTRA_SAN="DNS:host-a.example.org,IP:10.0.0.5" ./generate.sh   # SuperLink on another host
#
# Writes, next to this script:
#   ca.crt / ca.key               the CA; ca.crt goes to every SuperNode (--root-certificates)
#                                 and to every `flwr` client (root-certificates in config.toml)
#   server.pem / server.key       the SuperLink's certificate (SAN: superlink, localhost,
#                                 127.0.0.1 and $EXTRA_SAN) and private key
#   supernode-<i> / .pub          SuperNode i's ECDSA P-384 key pair in OpenSSH format
#                                 (--auth-supernode-private-key; `flwr supernode register`)
# Needs openssl and ssh-keygen (package openssh-client). Existing files are kept unless FORCE=1.
set -eu
cd "$(dirname "$0")"

SUPERNODES="${SUPERNODES:-2}"
DAYS="${DAYS:-365}"
SAN="DNS:superlink,DNS:localhost,IP:127.0.0.1${EXTRA_SAN:+,$EXTRA_SAN}"

if [ -f ca.crt ] && [ "${FORCE:-0}" != 1 ]; then
    echo "ca.crt exists; keeping the CA and server certificate (FORCE=1 to regenerate)"
else
    openssl req -x509 -newkey rsa:4096 -sha256 -nodes -days "$DAYS" \
        -keyout ca.key -out ca.crt -subj "/CN=fedleak test CA"
    openssl req -newkey rsa:4096 -sha256 -nodes \
        -keyout server.key -out server.csr -subj "/CN=superlink"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$SAN" > server.ext
    openssl x509 -req -sha256 -days "$DAYS" -in server.csr -CA ca.crt -CAkey ca.key \
        -CAcreateserial -extfile server.ext -out server.pem
    rm -f server.csr server.ext ca.srl
    echo "SuperLink certificate SAN: $SAN"
fi

i=0
while [ "$i" -lt "$SUPERNODES" ]; do
    if [ ! -f "supernode-$i" ] || [ "${FORCE:-0}" = 1 ]; then
        rm -f "supernode-$i" "supernode-$i.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedleak-supernode-$i" -f "supernode-$i"
    fi
    i=$((i + 1))
done
# The containers run as root, but the files are bind-mounted: keep private keys owner-only.
chmod 600 ca.key server.key supernode-*[0-9]
chmod 644 ca.crt server.pem supernode-*.pub
echo "written to $(pwd)"
