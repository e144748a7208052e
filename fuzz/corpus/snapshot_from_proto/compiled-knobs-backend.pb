
1Ü
0cc059d3099e1b88N
inbound127.0.0.2:15006 2inbound8BèĞHàÔRbackend-callersZ7
outbound127.0.0.2:15001 *outbound8HàÔZ?
outbound-tcp-db.default127.0.0.2:7000 2
db.default8HàÔ¡	
2a4cd96e3e21f554Œ	
outbound”
default-web.defaultB
web
web.default
web.default.svc
web.default.svc.cluster.local
web.defaultd*("ö÷ø*@HúP€€Z	š™™™™™É?
NŠ
backend-canary—
backend
backend.default
backend.default.svc
!backend.default.svc.cluster.local
api.example.com/api
x-canarytrue
x-debug ("GET"POST
backend-v2.defaultZ
backend.default
 Ğ*("ö÷ø*@HúP€€Z	š™™™™™É?
N2d2Ç
backend-regexw
backend
backend.default
backend.default.svc
!backend.default.svc.cluster.local
api.example.com^/v[0-9]+/items$
backend.defaultd*("ö÷ø*@HúP€€Z	š™™™™™É?
N½
default-backend.defaultc
backend
backend.default
backend.default.svc
!backend.default.svc.cluster.local
api.example.com
backend.defaultd*("ö÷ø*@HúP€€Z	š™™™™™É?
N¾
default-backend-v2.default^

backend-v2
backend-v2.default
backend-v2.default.svc
$backend-v2.default.svc.cluster.local
backend-v2.defaultd*("ö÷ø*@HúP€€Z	š™™™™™É?
N
default-jobs.batch@
jobs

jobs.batch
jobs.batch.svc
jobs.batch.svc.cluster.local

jobs.batchd*("ö÷ø*@HúP€€Z	š™™™™™É?
N"•
2a62489527a6dd94C
backend-v2.default
backend-v2default (è8J€€€ `àÔh‹
backend.defaultbackenddefault (ô0˜u8B
x-userJ€€€ R°êà§ 2(N08dAffffffş?H2Z

/healthzbackendˆ' è(0`àÔhd

db.defaultdbdefault (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2ZĞ è(0`àÔh
inbound (ô8`àÔhV

jobs.batchjobsbatch (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔhX
web.defaultwebdefault (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔh*­
e7f458fab3898805
backend-v2.default%
backend.default
127.0.0.1:9001 

db.default
127.0.0.9:5432
inbound
127.0.0.2:8080

jobs.batch
web.default2›
8f1e562ed5c00c44†
backend-callersq
	web-reads(spiffe://cluster.local/ns/default/sa/web$spiffe://cluster.local/ns/batch/sa/*default"GET*/api:£
c42ec2b071b40f3bcluster.localÿ-----BEGIN CERTIFICATE-----
MIIBqzCCAVKgAwIBAgIQc2RSXi7jHkf0bcasj0ZOdDAKBggqhkjOPQQDAjA2MQ0w
CwYDVQQKDAR3ZWZ0MSUwIwYDVQQDDBx3ZWZ0IHJvb3QgQ0EgKGNsdXN0ZXIubG9j
YWwpMB4XDTI2MTIwMTIxMDMzN1oXDTM2MTEyODIxMDQzN1owNjENMAsGA1UECgwE
d2VmdDElMCMGA1UEAwwcd2VmdCByb290IENBIChjbHVzdGVyLmxvY2FsKTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABGK7B2HtxUTwochWrriJAucOcE3/rk403WrB
5BCmMQJIPXjeWDbD6cMsuQTc2ET3sKJUuOOs1fmNxwBDcA3z1fWjQjBAMA4GA1Ud
DwEB/wQEAwIBhjAdBgNVHQ4EFgQUnwvsmADTjnvRd6wfnmvDTrI5EUIwDwYDVR0T
AQH/BAUwAwEB/zAKBggqhkjOPQQDAgNHADBEAiBs+jQ3bZiZj+MeUT/arV6rtfE0
/evUczo1kWKi6ViN+wIgQevoy3YO6YiFzGxJFbBSXd/PiGG2OEJN/igig+fBlcA=
-----END CERTIFICATE-----
