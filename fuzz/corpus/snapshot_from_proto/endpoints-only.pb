
2*m
b341eb852fbebb3b
api-v2.demo

api.demo
	echo.demo
127.0.0.9:7007
inbound
127.0.0.2:8080