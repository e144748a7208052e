
1¾
2be9cccfaf86406c:
inbound127.0.0.2:15006 2inbound8HàÔRapi-callers/
outbound127.0.0.2:15001 *outbound8HàÔ=
outbound-tcp-echo.demo127.0.0.2:7000 2	echo.demo8HàÔ‘
06b79df8e0eca81fü
outbound…
default-web.demo9
web
web.demo
web.demo.svc
web.demo.svc.cluster.local
web.demod*("ö÷ø*@HúP€€Z	š™™™™™É?
N›
api-canary-headerK
api
api.demo
api.demo.svc
api.demo.svc.cluster.local
x-canarytrue
api-v2.demod*("ö÷ø*@HúP€€Z	š™™™™™É?
N
api-v2-splitA
api
api.demo
api.demo.svc
api.demo.svc.cluster.local/v2/
api.demoP
api-v2.demo ˆ'*("ö÷ø*@HúP€€Z	š™™™™™É?
N‡
api-default>
api
api.demo
api.demo.svc
api.demo.svc.cluster.local/
api.demod**"ö÷ø8è@HúP€€Z	š™™™™™É?
N…
default-api.demo9
api
api.demo
api.demo.svc
api.demo.svc.cluster.local
api.demod*("ö÷ø*@HúP€€Z	š™™™™™É?
N—
default-api-v2.demoE
api-v2
api-v2.demo
api-v2.demo.svc
api-v2.demo.svc.cluster.local
api-v2.demod*("ö÷ø*@HúP€€Z	š™™™™™É?
N"‚
262d2194148d39ceX
api-v2.demoapi-v2demo (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔhR
api.demoapidemo (è0N8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔhT
	echo.demoechodemo (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔh
inbound (è8`àÔhR
web.demowebdemo (è0˜u8J€€€ R°êà§ 2(N08dAffffffş?H2`àÔh*y
daf28161b4b2a7b4
api-v2.demo

api.demo
	echo.demo
127.0.0.9:7007
inbound
127.0.0.2:8080

web.demo2Z
af756199487e5b2aF
api-callers5
web-may-call%spiffe://cluster.local/ns/demo/sa/web:£
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
