#!/usr/bin/env bash
# A self-signed TLS certificate for trying the stack: certs/tls.crt and certs/tls.key, valid for HOST (default
# localhost) and 127.0.0.1, 30 days. A hospital puts its own certificate there instead.
# Usage: ./make-certificate.sh [HOST] [FOLDER]
set -euo pipefail
host="${1:-localhost}"
folder="${2:-$(dirname "$0")/certs}"
mkdir -p "$folder"
openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$host" \
    -addext "subjectAltName=DNS:$host,IP:127.0.0.1" \
    -keyout "$folder/tls.key" -out "$folder/tls.crt" 2>/dev/null
chmod 600 "$folder/tls.key"
echo "wrote $folder/tls.crt and $folder/tls.key for $host"
