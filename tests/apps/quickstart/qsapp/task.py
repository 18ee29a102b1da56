"""qsapp: the model, the data and the training loop, as in Flower's quickstart-pytorch."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def normalize(images):
    """Pixels in [0, 1] to [-1, 1]: Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))."""
    return (images - 0.5) / 0.5


def load_data(partition_id: int, num_partitions: int, batch_size: int, data_path: str):
    """This partition's images: 80% to train on (shuffled mini-batches), 20% to test."""
    with np.load(data_path) as data:
        images, labels = data["images"], data["labels"]
    per_partition = len(labels) // num_partitions
    start = partition_id * per_partition
    x = torch.from_numpy(images[start : start + per_partition]).float()
    y = torch.from_numpy(labels[start : start + per_partition]).long()
    split = int(0.8 * len(y))
    train = TensorDataset(normalize(x[:split]), y[:split])
    test = TensorDataset(normalize(x[split:]), y[split:])
    trainloader = DataLoader(train, batch_size=batch_size, shuffle=True)
    testloader = DataLoader(test, batch_size=batch_size)
    return trainloader, testloader


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for images, labels in testloader:
            images, labels = images.to(device), labels.to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / max(1, len(testloader.dataset))
    return loss / max(1, len(testloader)), accuracy
