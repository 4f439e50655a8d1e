import socket,sys,time
if sys.argv[1]=='s':
    s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); s.bind(('0.0.0.0',5300)); s.listen(1)
    c,_=s.accept(); c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
    while True:
        b=c.recv(1)
        if not b: break
        c.sendall(b)
else:
    c=socket.create_connection((sys.argv[2],5300)); c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
    xs=[]
    for i in range(2200):
        t=time.perf_counter(); c.sendall(b'x'); c.recv(1); 
        if i>=200: xs.append((time.perf_counter()-t)*1e6)
    xs.sort(); print(f"p50 {xs[len(xs)//2]:.0f} us p99 {xs[int(len(xs)*0.99)]:.0f} us")
