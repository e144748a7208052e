
1±
ddac947ef62a9b27-
inbound127.0.0.2:15006 2inbound8H‡‘/
outbound127.0.0.2:15001 *outbound8H‡‘=
outbound-tcp-echo.demo127.0.0.2:7000 2	echo.demo8H‡‘Ô
bb955ad2dd9dc7ad⁄
outboundõ
api-canary-headerK
api
api.demo
api.demo.svc
api.demo.svc.cluster.local
x-canarytrue
api-v2.demod*("ˆ˜¯*@H˙PÄÄZ	öôôôôô…?
êNù
api-v2-splitA
api
api.demo
api.demo.svc
api.demo.svc.cluster.local/v2/
api.demoP
api-v2.demo à'*("ˆ˜¯*@H˙PÄÄZ	öôôôôô…?
êNá
api-default>
api
api.demo
api.demo.svc
api.demo.svc.cluster.local/
api.demod**"ˆ˜¯8Ë@H˙PÄÄZ	öôôôôô…?
êNÖ
default-api.demo9
api
api.demo
api.demo.svc
api.demo.svc.cluster.local
api.demod*("ˆ˜¯*@H˙PÄÄZ	öôôôôô…?
êN"Æ
f05c6639388dd773X
api-v2.demoapi-v2demo (Ë0òu8JÄÄÄ R∞Í‡ß 2(êN08dAffffff˛?H2`‡‘hR
api.demoapidemo (Ë0êN8JÄÄÄ R∞Í‡ß 2(êN08dAffffff˛?H2`‡‘hT
	echo.demoechodemo (Ë0òu8JÄÄÄ R∞Í‡ß 2(êN08dAffffff˛?H2`‡‘h
inbound (Ë8`‡‘h*m
b341eb852fbebb3b
api-v2.demo

api.demo
	echo.demo
127.0.0.9:7007
inbound
127.0.0.2:80802
cbf29ce484222325:£
c42ec2b071b40f3bcluster.localˇ-----BEGIN CERTIFICATE-----
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
